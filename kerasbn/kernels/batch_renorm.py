"""Batch renormalisation (Ioffe 2017): corrections and moving averages.

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
retrace. With r_max = 1 and d_max = 0 this is exactly batch norm. The step
itself is `training_step.py`'s; this module holds the corrections and the
five moving averages.
"""

import tensorflow as tf

from kerasbn.kernels.batch_norm import moving_average


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
