"""Keras layers: weights, flags and configuration around `kerasbn.kernels`."""

from kerasbn.layers.batch_norm import BatchNorm

__all__ = ["BatchNorm"]
