"""Batch normalisation over a global batch split across replicas.

Each replica computes its local moments in two passes, then one all-reduce sums, per feature and
in float64, n_i, n_i (m_i − s) and M2_i + n_i (m_i − s)², with n_i the replica's element count,
m_i its mean, M2_i its sum of squared deviations and s a shift identical on every replica (the
moving mean). With N = Σ n_i and D = Σ n_i (m_i − s) / N,

    mean = s + D,    variance = (Σ [M2_i + n_i (m_i − s)²]) / N − D²

(Chan et al.'s pairwise combination about a common shift: the subtraction only cancels the
(mean − s)² part, which float64 absorbs even with the shift far from the data). The caller passes
`all_reduce`, summing a list of tensors over replicas; collectives cannot run in an XLA cluster
on CPU, so a synchronized step runs inline (`routing.choose_route`: `collective`).
"""

import tensorflow as tf

# Refused: a recorded gradient (second order) through all-reduced statistics.
SECOND_ORDER_SYNCHRONIZED = (
    "A gradient of a gradient (gradient penalty, Hessian-vector product) through a layer with "
    "synchronized=True is not supported: its hand-derived gradient treats the global batch "
    "statistics as constants. Use synchronized=False for such models."
)


def combine_moments(mean, variance, count, shift, all_reduce):
    """Global `(mean, variance, count)` from local moments in broadcast shape (`count` may be a
    scalar or of size 1 on the feature axes), in `mean`'s dtype and shape; `shift` is per feature,
    identical on every replica."""
    shape = tf.shape(mean)
    n = tf.broadcast_to(tf.cast(count, tf.float64), shape)
    deviation = tf.cast(mean, tf.float64) - tf.cast(tf.reshape(shift, shape), tf.float64)
    squared = tf.cast(variance, tf.float64) * n + n * tf.square(deviation)
    packed = tf.stack([tf.reshape(t, [-1]) for t in (n, n * deviation, squared)])
    (total,) = all_reduce([packed])
    total_n, total_deviation, total_squared = tf.unstack(total)
    divisor = tf.maximum(total_n, 1.0)
    global_deviation = total_deviation / divisor
    global_variance = tf.maximum(total_squared / divisor - tf.square(global_deviation), 0.0)
    global_mean = tf.cast(tf.reshape(shift, [-1]), tf.float64) + global_deviation
    return tuple(
        tf.reshape(tf.cast(t, mean.dtype), shape) for t in (global_mean, global_variance, total_n)
    )
