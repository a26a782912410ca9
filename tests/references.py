"""Trusted references the tests compare against: float64 NumPy formulas."""

import numpy as np


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
