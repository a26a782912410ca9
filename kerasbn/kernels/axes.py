"""Axis bookkeeping shared by the kernels.

`feature_axes` is a sorted tuple of non-negative axes that keep their own statistics (usually the
channel axis); per-feature parameters such as gamma have `x`'s shape restricted to those axes.
"""

import tensorflow as tf


def reduction_axes(rank, feature_axes):
    """The axes the statistics are computed over: all but `feature_axes`."""
    return tuple(axis for axis in range(rank) if axis not in feature_axes)


def broadcast_shape(rank, feature_axes, feature_shape):
    """The shape broadcasting a per-feature tensor of `feature_shape` (a list or a 1-D shape
    tensor: kernels are traced with relaxed dimensions) against a rank-`rank` input."""
    dims = [1] * rank
    for position, axis in enumerate(feature_axes):
        dims[axis] = feature_shape[position]
    return tf.stack(dims) if any(tf.is_tensor(d) for d in dims) else dims


def to_broadcast(param, rank, feature_axes):
    """Reshapes a per-feature tensor to broadcast against the input; with the parameter's shape
    known, the new shape is a constant (one op fewer than reading it at run time)."""
    shape = param.shape.as_list() if param.shape.is_fully_defined() else tf.shape(param)
    return tf.reshape(param, broadcast_shape(rank, feature_axes, shape))


def mask_to_broadcast(mask, rank, feature_axes):
    """Turns a mask without the feature axes into a boolean broadcastable one."""
    mask = tf.cast(mask, tf.bool)
    for axis in feature_axes:
        mask = tf.expand_dims(mask, axis)
    return mask
