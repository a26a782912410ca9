"""Batch normalisation: inference, the moving averages, and the per-feature parameters.

The training step, shared with batch renormalisation and ghost batches, is `training_step.py`'s.
"""

import tensorflow as tf

from kerasbn.kernels import fused_op
from kerasbn.kernels.activations import activate
from kerasbn.kernels.axes import broadcast_shape, to_broadcast
from kerasbn.kernels.engine import FusedForm, kernel


def moving_average(moving, batch, momentum, valid):
    """Keras' rule `moving * momentum + batch * (1 - momentum)` where `valid`; elsewhere (no
    element, or a non-finite statistic) the moving value is kept: one bad batch cannot poison it."""
    updated = moving * momentum + batch * (1.0 - momentum)
    return tf.where(valid, updated, moving)


def statistics_are_usable(mean, variance, count):
    """Per feature: the batch had elements and its statistics are finite."""
    finite = tf.logical_and(tf.math.is_finite(mean), tf.math.is_finite(variance))
    return tf.logical_and(finite, count > 0)


def affine_parameters(x, gamma, beta, feature_axes, feature_shape):
    """gamma and beta shaped to broadcast; ones and zeros of `feature_shape` when absent."""
    rank = x.shape.rank
    shape = broadcast_shape(rank, feature_axes, feature_shape)
    gamma = tf.ones(shape, x.dtype) if gamma is None else to_broadcast(gamma, rank, feature_axes)
    beta = tf.zeros(shape, x.dtype) if beta is None else to_broadcast(beta, rank, feature_axes)
    return gamma, beta


def updated_moving_statistics(state, mean, variance, usable, *, momentum):
    """`state`'s `moving_mean` and `moving_variance` (per feature) after one batch, kept where
    the batch statistics are not `usable` (`statistics_are_usable`)."""
    return {
        "moving_mean": moving_average(state["moving_mean"], mean, momentum, usable),
        "moving_variance": moving_average(state["moving_variance"], variance, momentum, usable),
    }


def _fused_inference(x, gamma, beta, mean, variance, *, epsilon, feature_axes, activation=None):
    del feature_axes  # `accepts_inference` took only channels-last inputs
    return fused_op.inference(
        x, gamma, beta, mean, variance, epsilon=epsilon, activation=activation
    )


def _accepts_fused_inference(x, *args, epsilon, feature_axes, **_):
    del args  # `batch_norm_inference`'s signature
    return fused_op.accepts_inference(x, feature_axes=feature_axes, epsilon=epsilon)


@kernel(fused=FusedForm("inference", _accepts_fused_inference, _fused_inference))
def batch_norm_inference(
    x, gamma, beta, mean, variance, *, build, epsilon, feature_axes, activation=None
):
    """Normalises `x` with given (moving) statistics: `y = f(x * scale + shift)`, with
    `scale = γ / sqrt(var + ε)` and `shift = β - mean * scale` computed per feature first: one
    fused pass under XLA; in an untaped graph run op by op the router may run TensorFlow's
    `FusedBatchNormV3` instead (`fused_op.inference`). `build` is unused (no sums, no gradient)."""
    del build
    rank = x.shape.rank
    scale = tf.math.rsqrt(variance + epsilon)
    scale = scale if gamma is None else scale * gamma
    shift = -mean * scale
    shift = shift if beta is None else shift + beta
    if tuple(feature_axes) != (rank - 1,):  # per-channel vectors broadcast on the last axis as is
        scale = to_broadcast(scale, rank, feature_axes)
        shift = to_broadcast(shift, rank, feature_axes)
    return activate(x * scale + shift, activation)
