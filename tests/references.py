"""Trusted references the tests compare against: float64 NumPy formulas, and the
same formulas in float64 TensorFlow ops whose autodiff gives exact gradients."""

import numpy as np
import tensorflow as tf


def feature_axes_of(axis, rank):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return tuple(sorted(a % rank for a in axes))


def batch_norm_reference(x, gamma, beta, epsilon, axis, mask=None):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta in float64.

    Returns (y, batch_mean, batch_variance) with the statistics in the
    per-feature shape. `mask` has x's shape without the feature axes.
    """
    x = np.asarray(x, np.float64)
    rank = x.ndim
    features = feature_axes_of(axis, rank)
    reduce = tuple(a for a in range(rank) if a not in features)
    if mask is None:
        weights = np.ones_like(x)
    else:
        weights = np.asarray(mask, np.float64)
        for a in features:
            weights = np.expand_dims(weights, a)
        weights = np.broadcast_to(weights, x.shape)
    safe_x = np.where(weights > 0, x, 0.0)
    count = weights.sum(axis=reduce, keepdims=True)
    mean = safe_x.sum(axis=reduce, keepdims=True) / count
    var = (weights * (safe_x - mean) ** 2).sum(axis=reduce, keepdims=True) / count
    shape = [x.shape[a] if a in features else 1 for a in range(rank)]
    g = np.ones(shape) if gamma is None else np.reshape(np.asarray(gamma, np.float64), shape)
    b = np.zeros(shape) if beta is None else np.reshape(np.asarray(beta, np.float64), shape)
    y = g * (x - mean) / np.sqrt(var + epsilon) + b
    feature_shape = [x.shape[a] for a in features]
    return y, mean.reshape(feature_shape), var.reshape(feature_shape)


def inference_reference(x, gamma, beta, mean, variance, epsilon, axis):
    x = np.asarray(x, np.float64)
    features = feature_axes_of(axis, x.ndim)
    shape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]

    def r(v):
        return np.reshape(np.asarray(v, np.float64), shape)

    return r(gamma) * (x - r(mean)) / np.sqrt(r(variance) + epsilon) + r(beta)


def central_differences(function, x0, step=1e-6):
    """d function / d x at x0 by central differences, one element at a time.

    `function` maps a float64 array shaped like `x0` to a scalar.
    """
    x0 = np.asarray(x0, np.float64)
    gradient = np.zeros_like(x0)
    for index in np.ndindex(x0.shape):
        plus, minus = x0.copy(), x0.copy()
        plus[index] += step
        minus[index] -= step
        gradient[index] = (float(function(plus)) - float(function(minus))) / (2 * step)
    return gradient


# -- the same formulas in TensorFlow float64, for gradients of any order ----------
#
# Written with plain TensorFlow ops (no custom gradient, no XLA, no block sums),
# so TensorFlow's autodiff of them is the exact derivative, to any order. Every
# argument is a float64 tensor (or None) with a static shape.


def masked_moments_formula(x, weights, axes):
    """`(count, mean, biased variance)` of `x` over `axes` where `weights` is 1.

    Where nothing counts (an empty or fully masked batch) mean and variance
    are 0. The reduced axes are kept.
    """
    weights = tf.broadcast_to(weights, tf.shape(x))
    counted = weights > 0
    count = tf.reduce_sum(weights, axis=axes, keepdims=True)
    divisor = tf.maximum(count, 1.0)
    zeros = tf.zeros_like(x)
    mean = tf.reduce_sum(tf.where(counted, x, zeros), axis=axes, keepdims=True) / divisor
    squares = tf.where(counted, tf.square(x - mean), zeros)
    return count, mean, tf.reduce_sum(squares, axis=axes, keepdims=True) / divisor


def _feature_weights(x, mask, features):
    if mask is None:
        return tf.ones_like(x)
    weights = tf.cast(mask, tf.float64)
    for axis in features:
        weights = tf.expand_dims(weights, axis)
    return weights


def batch_norm_formula(x, gamma, beta, epsilon, axis, mask=None, renorm=None):
    """Training-mode batch norm, or batch renorm with `renorm`.

    Args:
      renorm: None, or a dict of `renorm_mean`, `renorm_stddev` (per feature)
        and the numbers `r_max`, `d_max`: Ioffe's
        `y = γ ((x − μ_B)/σ_B · r + d) + β`, r and d clipped and constant for
        the gradient, σ floored at sqrt(ε); r = 1, d = 0 without statistics.

    Returns:
      `(y, mean, variance, count)`, the statistics per feature; a feature
      without counted elements gives `y = β`.
    """
    rank = len(x.shape)
    features = feature_axes_of(axis, rank)
    reduce = tuple(a for a in range(rank) if a not in features)
    shape = [x.shape[a] if a in features else 1 for a in range(rank)]
    count, mean, variance = masked_moments_formula(x, _feature_weights(x, mask, features), reduce)
    has_elements = count > 0
    normalized = tf.where(has_elements, (x - mean) / tf.sqrt(variance + epsilon), 0.0)
    if renorm is not None:
        reference_stddev = tf.maximum(tf.reshape(renorm["renorm_stddev"], shape), epsilon**0.5)
        r_max, d_max = renorm["r_max"], renorm["d_max"]
        r = tf.clip_by_value(tf.sqrt(variance + epsilon) / reference_stddev, 1 / r_max, r_max)
        d = (mean - tf.reshape(renorm["renorm_mean"], shape)) / reference_stddev
        d = tf.clip_by_value(d, -d_max, d_max)
        r = tf.stop_gradient(tf.where(has_elements, r, 1.0))
        d = tf.stop_gradient(tf.where(has_elements, d, 0.0))
        normalized = normalized * r + d
    y = tf.reshape(gamma, shape) * normalized + tf.reshape(beta, shape)
    feature_shape = [x.shape[a] for a in features]

    def per_feature(t):
        return tf.reshape(tf.broadcast_to(t, shape), feature_shape)

    return y, per_feature(mean), per_feature(variance), per_feature(count)


def inference_formula(x, gamma, beta, mean, variance, epsilon, axis):
    """`γ (x − mean) / sqrt(variance + ε) + β` with given (moving) statistics."""
    rank = len(x.shape)
    features = feature_axes_of(axis, rank)
    shape = [x.shape[a] if a in features else 1 for a in range(rank)]
    gamma, beta, mean, variance = (tf.reshape(t, shape) for t in (gamma, beta, mean, variance))
    return gamma * (x - mean) / tf.sqrt(variance + epsilon) + beta


def group_norm_formula(x, gamma, beta, groups, epsilon, axis, mask=None):
    """Wu & He's group norm; `mask` has x's shape without the channel axis.

    A sample's group without counted elements gives `β`.
    """
    rank = len(x.shape)
    channel_axis = axis % rank
    order = [a for a in range(rank) if a != channel_axis] + [channel_axis]
    last = tf.transpose(x, order)
    channels = x.shape[channel_axis]
    grouped = tf.reshape(last, list(last.shape[:-1]) + [groups, channels // groups])
    weights = tf.ones(grouped.shape[:-2], tf.float64) if mask is None else tf.cast(mask, tf.float64)
    weights = weights[..., None, None]
    axes = tuple(range(1, rank - 1)) + (rank,)  # other axes and the group's channels
    count, mean, variance = masked_moments_formula(grouped, weights, axes)
    normalized = tf.where(count > 0, (grouped - mean) / tf.sqrt(variance + epsilon), 0.0)
    y = tf.reshape(normalized, tf.shape(last)) * gamma + beta
    return tf.transpose(y, np.argsort(order))


def moving_average_formula(moving, batch, momentum, count):
    """Keras' `moving · momentum + batch · (1 − momentum)`, kept where count is 0."""
    return tf.where(count > 0, moving * momentum + batch * (1.0 - momentum), moving)
