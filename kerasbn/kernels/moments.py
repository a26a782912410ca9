"""Numerically stable batch moments.

The variance is computed in two passes, mean first and then the mean squared
deviation from it. The one-pass E[x^2] - E[x]^2 loses every significant digit
when the mean is large against the spread (float32 data at mean 1e4 and unit
variance gives garbage or a negative variance), and is never used here.
"""

import tensorflow as tf


def element_count(x, axes, mask=None):
    """Number of elements each statistic is taken over, keeping dims.

    Without a mask this is the product of the reduced dimensions (zero for an
    empty batch). With a boolean `mask` broadcastable to `x` it is the number of
    unmasked positions, per feature position of the mask.
    """
    if mask is None:
        dims = tf.gather(tf.shape(x), list(axes))
        return tf.cast(tf.reduce_prod(dims), x.dtype)
    ones = tf.cast(tf.broadcast_to(mask, _mask_shape(x, mask, axes)), x.dtype)
    return tf.reduce_sum(ones, axis=axes, keepdims=True)


def _mask_shape(x, mask, axes):
    # Every reduced axis counts at x's size (a mask of size 1 there stands for
    # all of it: group norm's channels within a group); kept axes stay as in
    # the mask, so no work is spent broadcasting over the features.
    rank = x.shape.rank
    reduced = tf.constant([axis in axes for axis in range(rank)])
    return tf.where(reduced, tf.shape(x), tf.shape(mask))


def moments(x, axes, mask=None):
    """Mean, biased variance and element count of `x` over `axes`.

    Args:
      x: float tensor.
      axes: tuple of axes to reduce.
      mask: optional boolean tensor broadcastable to `x`; False positions are
        excluded. Their values never enter the statistics, even NaN or inf.

    Returns:
      `(mean, variance, count)` with reduced axes kept as size 1. Where `count`
      is zero (empty batch, fully masked batch) mean and variance are zero, not
      NaN.
    """
    count = element_count(x, axes, mask)
    divisor = tf.maximum(count, 1.0)
    if mask is None:
        mean = tf.reduce_sum(x, axis=axes, keepdims=True) / divisor
        deviation = tf.square(x - mean)
    else:
        zeros = tf.zeros_like(x)
        mean = tf.reduce_sum(tf.where(mask, x, zeros), axis=axes, keepdims=True)
        mean = mean / divisor
        deviation = tf.where(mask, tf.square(x - mean), zeros)
    variance = tf.reduce_sum(deviation, axis=axes, keepdims=True) / divisor
    return mean, variance, count
