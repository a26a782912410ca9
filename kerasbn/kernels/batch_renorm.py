"""Batch renormalisation (Ioffe 2017): the training step.

Training normalises with the batch statistics and then corrects toward the
moving ones:

    x̂ = (x − μ_B) / σ_B · r + d,   σ_B = sqrt(σ²_B + ε)
    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)

with r and d constants for the gradient. As in Keras' `renorm=True`, (μ, σ) are
the "renorm" averages kept with `renorm_momentum` (σ floored at sqrt(ε) so the
first steps cannot divide by zero), while inference uses a second pair kept with
`momentum`: the moving mean and moving standard deviation, from which the moving
variance is derived as max(σ_mov² − ε, 0). Inference is plain batch norm with
the moving mean and variance (`batch_norm.batch_norm_inference`).

`r_max` and `d_max` are tensors, so a schedule changing them every step does not
retrace. With r_max = 1 and d_max = 0 this is exactly batch norm.
"""

import tensorflow as tf

from kerasbn.kernels.batch_norm import affine_parameters, batch_moments, moving_average
from kerasbn.kernels.batch_norm import statistics_are_usable
from kerasbn.kernels.compile import kernel
from kerasbn.kernels.normalize import normalize_with_batch_statistics


def renorm_corrections(mean, variance, renorm_mean, renorm_stddev, usable, r_max, d_max, epsilon):
    """The clipped corrections `(r, d)`, in the broadcast shape of `mean`.

    Features without usable statistics get r = 1, d = 0 (their output is β).
    """
    batch_stddev = tf.sqrt(variance + epsilon)
    reference_stddev = tf.maximum(renorm_stddev, tf.sqrt(tf.constant(epsilon, mean.dtype)))
    r = tf.clip_by_value(batch_stddev / reference_stddev, 1.0 / r_max, r_max)
    d = tf.clip_by_value((mean - renorm_mean) / reference_stddev, -d_max, d_max)
    r = tf.where(usable, r, tf.ones_like(r))
    d = tf.where(usable, d, tf.zeros_like(d))
    return tf.stop_gradient(r), tf.stop_gradient(d)


def updated_renorm_statistics(state, mean, variance, usable, *, momentum, renorm_momentum, epsilon):
    """All moving statistics after one batch, skipping features without usable statistics.

    Args:
      state: dict with per-feature `moving_mean`, `moving_variance`,
        `moving_stddev`, `renorm_mean` and `renorm_stddev`.
      mean, variance, usable: batch statistics and their usability, per feature.

    Returns:
      A dict with the new `moving_mean`, `moving_variance`, `moving_stddev`,
      `renorm_mean` and `renorm_stddev`.
    """
    # The moving averages never carry a gradient to x, in any mode.
    mean, variance = tf.stop_gradient(mean), tf.stop_gradient(variance)
    batch_stddev = tf.sqrt(variance + epsilon)
    moving_stddev = moving_average(state["moving_stddev"], batch_stddev, momentum, usable)
    return {
        "moving_mean": moving_average(state["moving_mean"], mean, momentum, usable),
        "moving_variance": tf.where(
            usable, tf.nn.relu(tf.square(moving_stddev) - epsilon), state["moving_variance"]
        ),
        "moving_stddev": moving_stddev,
        "renorm_mean": moving_average(state["renorm_mean"], mean, renorm_momentum, usable),
        "renorm_stddev": moving_average(state["renorm_stddev"], batch_stddev, renorm_momentum, usable),
    }


def batch_renorm_step(
    x,
    gamma,
    beta,
    state,
    mask,
    r_max,
    d_max,
    *,
    momentum,
    renorm_momentum,
    epsilon,
    feature_axes,
    combine=None,
    all_reduce=None,
    activation=None,
):
    """One training step of batch renormalisation.

    Compiled as the kernel `batch_renorm_train` (without `combine` and
    `all_reduce`).

    Args:
      x: float tensor of rank 2 or more (float32 or float64).
      gamma, beta: per-feature tensors, or None for no scale / no offset.
      state: dict of per-feature tensors `moving_mean`, `moving_variance`,
        `moving_stddev`, `renorm_mean`, `renorm_stddev`.
      mask: optional boolean tensor of `x`'s shape without the feature axes.
      r_max, d_max: scalar tensors, r_max >= 1 and d_max >= 0.
      momentum, renorm_momentum, epsilon: Python floats.
      feature_axes: sorted tuple of non-negative feature axes.
      combine: optional `combine(mean, variance, count)` turning local moments
        into the global batch's (synchronized training).
      all_reduce: optional callable summing the backward pass's per-feature
        sums over replicas.
      activation: None, or the name of a fused activation applied to the
        output (`activations.ACTIVATIONS`).

    Returns:
      `(y, new_state)`: the output, and a dict of the new `moving_mean`,
      `moving_variance`, `moving_stddev`, `renorm_mean`, `renorm_stddev`
      (unchanged for a feature whose batch had no element or a non-finite
      statistic).
    """
    mean, variance, count, axes, mask = batch_moments(x, feature_axes, mask)
    if combine is not None:
        mean, variance, count = combine(mean, variance, count)
    feature_shape = tf.shape(state["moving_mean"])
    gamma_b, beta_b = affine_parameters(x, gamma, beta, feature_axes, feature_shape)
    usable_b = tf.broadcast_to(statistics_are_usable(mean, variance, count), tf.shape(mean))

    def per_feature(value):
        return tf.reshape(value, feature_shape)

    def broadcast(value):
        return tf.reshape(value, tf.shape(mean))

    r, d = renorm_corrections(
        mean,
        variance,
        broadcast(state["renorm_mean"]),
        broadcast(state["renorm_stddev"]),
        usable_b,
        tf.cast(r_max, x.dtype),
        tf.cast(d_max, x.dtype),
        epsilon,
    )
    y = normalize_with_batch_statistics(
        x,
        gamma_b,
        beta_b,
        mean,
        variance,
        count,
        epsilon=epsilon,
        axes=axes,
        mask=mask,
        r=r,
        d=d,
        all_reduce=all_reduce,
        activation=activation,
    )
    new_state = updated_renorm_statistics(
        state,
        per_feature(mean),
        per_feature(variance),
        per_feature(usable_b),
        momentum=momentum,
        renorm_momentum=renorm_momentum,
        epsilon=epsilon,
    )
    return y, new_state


batch_renorm_train = kernel(batch_renorm_step)
