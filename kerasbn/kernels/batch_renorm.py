"""Batch renormalisation (Ioffe 2017): corrections and moving averages.

Training normalises with the batch statistics and corrects toward the moving ones:

    x̂ = (x − μ_B) / σ_B · r + d,   σ_B = sqrt(σ²_B + ε)
    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − μ) / σ, −d_max, d_max)

with r, d constants for the gradient and (μ, σ) the renorm averages kept with `renorm_momentum`
(σ floored at sqrt(ε)), as in Keras' `renorm=True`. Inference uses the moving mean and standard
deviation kept with `momentum` (moving variance max(σ_mov² − ε, 0)). `r_max`, `d_max` are tensors,
so schedules do not retrace; r_max = 1, d_max = 0 is batch norm. The step is `training_step.py`'s.
"""

import tensorflow as tf

from kerasbn.kernels.batch_norm import moving_average


def renorm_corrections(mean, variance, renorm_mean, renorm_stddev, usable, r_max, d_max, epsilon):
    """The clipped corrections `(r, d)` in `mean`'s shape; r = 1, d = 0 where not `usable`."""
    batch_stddev = tf.sqrt(variance + epsilon)
    reference_stddev = tf.maximum(renorm_stddev, tf.sqrt(tf.constant(epsilon, mean.dtype)))
    r = tf.clip_by_value(batch_stddev / reference_stddev, 1.0 / r_max, r_max)
    d = tf.clip_by_value((mean - renorm_mean) / reference_stddev, -d_max, d_max)
    r = tf.where(usable, r, tf.ones_like(r))
    d = tf.where(usable, d, tf.zeros_like(d))
    return tf.stop_gradient(r), tf.stop_gradient(d)


def updated_renorm_statistics(state, mean, variance, usable, *, momentum, renorm_momentum, epsilon):
    """The five moving statistics after one batch, skipping features not `usable`: `state` and
    the result are dicts of per-feature `moving_mean`, `moving_variance`, `moving_stddev`,
    `renorm_mean` and `renorm_stddev`; `mean` and `variance` without gradient."""
    batch_stddev = tf.sqrt(variance + epsilon)
    moving_stddev = moving_average(state["moving_stddev"], batch_stddev, momentum, usable)
    return {
        "moving_mean": moving_average(state["moving_mean"], mean, momentum, usable),
        "moving_variance": tf.where(
            usable, tf.nn.relu(tf.square(moving_stddev) - epsilon), state["moving_variance"]
        ),
        "moving_stddev": moving_stddev,
        "renorm_mean": moving_average(state["renorm_mean"], mean, renorm_momentum, usable),
        "renorm_stddev": moving_average(
            state["renorm_stddev"], batch_stddev, renorm_momentum, usable
        ),
    }
