"""Keras layers: weights, flags and configuration around `kerasbn.kernels`."""

from kerasbn.layers.batch_norm import BatchNorm
from kerasbn.layers.batch_renorm import BatchRenorm
from kerasbn.layers.group_norm import GroupNorm

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm"]
