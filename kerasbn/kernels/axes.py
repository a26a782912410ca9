"""Axis bookkeeping shared by the kernels.

`feature_axes` is a sorted tuple of non-negative axes that keep their own
statistics (the channel axis, usually). Per-feature parameters such as gamma have
the shape of `x` restricted to those axes.
"""

import tensorflow as tf


def reduction_axes(rank, feature_axes):
    """The axes the statistics are computed over: all but `feature_axes`."""
    return tuple(axis for axis in range(rank) if axis not in feature_axes)


def broadcast_shape(rank, feature_axes, feature_shape):
    """Shape that broadcasts a per-feature tensor against a rank-`rank` input.

    `feature_shape` may be a static list or a 1-D shape tensor (the kernels are
    traced with relaxed, possibly unknown, dimensions).
    """
    dims = [1] * rank
    for position, axis in enumerate(feature_axes):
        dims[axis] = feature_shape[position]
    return tf.stack(dims) if any(tf.is_tensor(d) for d in dims) else dims


def to_broadcast(param, rank, feature_axes):
    """Reshapes a per-feature tensor so it broadcasts against the input.

    With the parameter's shape known (inline in a caller's graph) the new
    shape is a constant: one op fewer to trace and optimize per parameter
    than reading it at run time (programs traced with relaxed shapes must).
    """
    shape = param.shape.as_list() if param.shape.is_fully_defined() else tf.shape(param)
    return tf.reshape(param, broadcast_shape(rank, feature_axes, shape))


def mask_to_broadcast(mask, rank, feature_axes):
    """Turns a mask without the feature axes into a boolean broadcastable one."""
    mask = tf.cast(mask, tf.bool)
    for axis in feature_axes:
        mask = tf.expand_dims(mask, axis)
    return mask
