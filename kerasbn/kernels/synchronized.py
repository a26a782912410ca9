"""Batch normalisation over a global batch split across replicas.

Each replica computes its local moments in two passes (stable), then a single
all-reduce sums, per feature and in float64,

    n_i,    n_i (m_i − s),    M2_i + n_i (m_i − s)²

where n_i is the replica's element count (replicas may differ: masks, an uneven
last batch), m_i its mean, M2_i its sum of squared deviations, and s a shift
shared by every replica (the moving mean, identical on all replicas). Then, with
N = Σ n_i and D = Σ n_i (m_i − s) / N,

    mean = s + D,    variance = (Σ [M2_i + n_i (m_i − s)²]) / N − D².

This is Chan et al.'s pairwise combination taken about a common shift: the
subtraction only cancels the (mean − s)² part, which float64 absorbs even when the
shift is far from the data (moving mean 0, data at 1e4). The backward pass
all-reduces its two per-feature sums (see `normalize.py`).

Nothing here knows about `tf.distribute`: the caller passes `all_reduce`, a
function summing a list of tensors over replicas. Collective operations cannot
run inside an XLA cluster on CPU, so these functions are traced into the
caller's graph rather than compiled as one kernel.
"""

import tensorflow as tf

from kerasbn.kernels.batch_norm import affine_parameters, batch_moments, updated_moving_statistics
from kerasbn.kernels.batch_renorm import batch_renorm_step
from kerasbn.kernels.normalize import normalize_with_batch_statistics


def combine_moments(mean, variance, count, shift, all_reduce):
    """Global (mean, variance, count) from each replica's local moments.

    Args:
      mean, variance, count: local moments in broadcast shape (count may be a
        scalar or have size 1 on the feature axes).
      shift: per-feature tensor, identical on every replica.
      all_reduce: callable summing a list of tensors over replicas.

    Returns:
      Global mean and variance in `mean`'s dtype and shape, and the global count
      (float, broadcastable the same way).
    """
    dtype = mean.dtype
    shape = tf.shape(mean)
    n = tf.broadcast_to(tf.cast(count, tf.float64), shape)
    deviation = tf.cast(mean, tf.float64) - tf.cast(tf.reshape(shift, shape), tf.float64)
    squared = tf.cast(variance, tf.float64) * n + n * tf.square(deviation)
    packed = tf.stack([tf.reshape(n, [-1]), tf.reshape(n * deviation, [-1]), tf.reshape(squared, [-1])])
    (total,) = all_reduce([packed])
    total_n, total_deviation, total_squared = tf.unstack(total)
    divisor = tf.maximum(total_n, 1.0)
    global_deviation = total_deviation / divisor
    global_variance = tf.maximum(total_squared / divisor - tf.square(global_deviation), 0.0)
    global_mean = tf.cast(tf.reshape(shift, [-1]), tf.float64) + global_deviation

    def back(values):
        return tf.reshape(tf.cast(values, dtype), shape)

    return back(global_mean), back(global_variance), back(total_n)


def synchronized_batch_norm_train(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    mask=None,
    *,
    all_reduce,
    momentum,
    epsilon,
    feature_axes,
    activation=None,
):
    """`batch_norm_train` with the statistics of the global batch.

    Same arguments and results as `kernels.batch_norm.batch_norm_train`, plus
    `all_reduce`. Every replica returns identical moving statistics.
    """
    mean, variance, count, axes, mask = batch_moments(x, feature_axes, mask)
    mean, variance, count = combine_moments(mean, variance, count, moving_mean, all_reduce)
    gamma_b, beta_b = affine_parameters(x, gamma, beta, feature_axes, tf.shape(moving_mean))
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
        all_reduce=all_reduce,
        activation=activation,
    )
    new_mean, new_variance = updated_moving_statistics(
        moving_mean, moving_variance, mean, variance, count, momentum
    )
    return y, new_mean, new_variance


def synchronized_batch_renorm_train(
    x,
    gamma,
    beta,
    state,
    mask,
    r_max,
    d_max,
    *,
    all_reduce,
    momentum,
    renorm_momentum,
    epsilon,
    feature_axes,
    activation=None,
):
    """`batch_renorm_train` with the statistics of the global batch.

    Same arguments and results as `kernels.batch_renorm.batch_renorm_train`,
    plus `all_reduce`. The corrections r and d are computed from the global
    statistics, so every replica applies the same ones.
    """

    def combine(mean, variance, count):
        return combine_moments(mean, variance, count, state["moving_mean"], all_reduce)

    return batch_renorm_step(
        x,
        gamma,
        beta,
        state,
        mask,
        r_max,
        d_max,
        momentum=momentum,
        renorm_momentum=renorm_momentum,
        epsilon=epsilon,
        feature_axes=feature_axes,
        combine=combine,
        all_reduce=all_reduce,
        activation=activation,
    )
