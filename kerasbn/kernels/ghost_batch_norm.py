"""Ghost batch normalisation (Hoffer et al. 2017): statistics per ghost batch.

Layout. A batch of B examples is cut into contiguous ghost batches of
v = `virtual_batch_size` examples: examples 0..v-1, v..2v-1, ... When v does
not divide B, the last ghost batch holds the B mod v remaining examples and has
its own statistics; a batch smaller than v is a single ghost batch. (tf_keras
strides instead: its ghost batch j holds examples j, j + B/v, j + 2B/v, ...)

The q = B // v full ghost batches are the first q·v examples viewed as
`[q, v, ...]` (a free reshape), whose statistics are taken over every axis but
the ghost axis and the feature axes: the per-sample layout of group norm, summed
by `moments.sum_over` (one pass over x per sum; for up to
`Policy.group_matmul_limit` ghost batches, arranged as batch norm's sums). The
remainder is an ordinary batch. The step itself is `training_step.py`'s. Per ghost batch g and feature, with N_g elements:

    x̂ = (x − μ_g) / sqrt(σ²_g + ε),    y = f(γ (r_g x̂ + d_g) + β)

with r_g = 1, d_g = 0 for batch norm, and for batch renormalisation Ioffe's
corrections taken per ghost batch against the renorm averages (μ, σ):
r_g = clip(σ_g / σ, 1/r_max, r_max), d_g = clip((μ_g − μ) / σ, −d_max, d_max),
so that each ghost batch is corrected toward the same reference. (tf_keras
computes one r and d from the average of the ghost statistics instead.)

Gradient. The ghost batches are independent normalisations that share γ and β,
so the hand-derived gradient of `normalize.py` holds per ghost batch (its N, S1
and S2 are the ghost batch's), and dγ, dβ add up over ghost batches.

Moving statistics, per feature, from the ghost batches' counts N_g, means μ_g
and variances σ²_g (N = Σ N_g):

    mean          = Σ N_g μ_g / N                            (both rules)
    "batch"       variance = Σ N_g (σ²_g + (μ_g − mean)²) / N
    "ghost_mean"  variance = Σ N_g σ²_g / N

"batch" (the default) is the exact mean and variance of the whole batch (the
law of total variance), what one-batch normalisation and `recalibrate` use.
"ghost_mean" is tf_keras' rule, the mean of the ghost means and of the ghost
variances (weighted by size, which is equal weights when v divides B and nothing
is masked): its variance leaves out the spread of the ghost means.

Precision: every ghost batch's own statistics are two-pass (stable), but the
spread of the ghost means, (μ_g − mean)², is taken from means rounded to the
input's precision. For float32 data whose mean is far from zero against its
spread (|mean| = 1e4 σ) the "batch" moving variance is therefore off by about
1e-4 relative, where one-batch normalisation is off by 1e-7; float64 layers are
exact. The normalisation itself does not use this term.
"""

import tensorflow as tf

from kerasbn.kernels.synchronized import combine_moments

MOVING_STATISTICS = ("batch", "ghost_mean")


def _batch_size(x):
    static = x.shape[0]
    return static if static is not None else tf.shape(x)[0]


def ghost_parts(x, virtual_batch_size):
    """Splits the batch axis into full ghost batches and the remainder.

    Returns `(full, remainder)`: `full` is the first q·v examples viewed as
    `[q, v, ...]` (q = B // v) and `remainder` the last B mod v examples, shaped
    as `x`. Both always exist, possibly empty, so that a kernel records the same
    residuals whether or not the batch size is known while tracing.
    """
    batch, v = _batch_size(x), virtual_batch_size
    full_batches = batch // v
    head = full_batches * v
    shape = tf.concat([tf.reshape(full_batches, [1]), [v], tf.shape(x)[1:]], axis=0)
    full = tf.reshape(x[:head], shape)
    full.set_shape([full_batches if isinstance(batch, int) else None, v] + x.shape[1:].as_list())
    return full, x[head:]


def combine_ghosts(parts, feature_shape):
    """Per-feature statistics of the whole batch from its ghost batches
    (`training_step.Part`s).

    Returns a dict of `mean`, `variance` (exact, law of total variance),
    `ghost_variance` (Σ N_g σ²_g / N) and `count` (N), each of `feature_shape`.
    """
    counts, means, variances = (
        tf.concat([part.per_ghost(getattr(part, name), feature_shape) for part in parts], axis=0)
        for name in ("count", "mean", "variance")
    )
    total = tf.reduce_sum(counts, axis=0)
    divisor = tf.maximum(total, 1.0)
    mean = tf.reduce_sum(counts * means, axis=0) / divisor
    ghost_variance = tf.reduce_sum(counts * variances, axis=0) / divisor
    between = tf.reduce_sum(counts * tf.square(means - mean), axis=0) / divisor
    statistics = {
        "mean": mean,
        "variance": ghost_variance + between,
        "ghost_variance": ghost_variance,
        "count": total,
    }
    return {name: tf.stop_gradient(value) for name, value in statistics.items()}


def moving_statistics_of(statistics, rule, shift, all_reduce=None):
    """Per-feature `(mean, variance, count)` the moving averages follow.

    Args:
      statistics: the dict `combine_ghosts` returns.
      rule: "batch" or "ghost_mean" (see the module docstring).
      shift: per-feature tensor identical on every replica (the moving mean),
        for the all-reduce (`synchronized.combine_moments`).
      all_reduce: None, or a callable summing a list of tensors over replicas:
        the statistics are then those of the global batch (all ghost batches
        of all replicas), identical on every replica, in one all-reduce.
    """
    mean, count = statistics["mean"], statistics["count"]
    variance = statistics["variance"] if rule == "batch" else statistics["ghost_variance"]
    if all_reduce is None:
        return mean, variance, count
    if rule == "batch":
        return combine_moments(mean, variance, count, shift, all_reduce)
    # Both in one all-reduce: row 0 gives the global mean; row 1 is centred on
    # the shift itself, so its combined variance has no spread-of-means term
    # and is the pooled Σ N_i σ²_ghost,i / N.
    means, variances, counts = combine_moments(
        tf.stack([mean, shift]),
        tf.stack([variance, variance]),
        tf.stack([count, count]),
        tf.stack([shift, shift]),
        all_reduce,
    )
    return means[0], variances[1], counts[0]
