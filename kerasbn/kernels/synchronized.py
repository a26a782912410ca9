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
run inside an XLA cluster on CPU, so a synchronized step runs inline in the
caller's graph (`routing.choose_route`: `collective`).
"""

import tensorflow as tf



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
