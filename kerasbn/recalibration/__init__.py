"""Exact population statistics for the normalization layers of a trained model."""

from kerasbn.recalibration.recalibrate import LayerReport, recalibrate

__all__ = ["LayerReport", "recalibrate"]
