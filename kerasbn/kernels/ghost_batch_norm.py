"""Ghost batch normalisation (Hoffer et al. 2017): statistics per ghost batch.

A batch of B examples is cut into contiguous ghost batches of v = `virtual_batch_size` examples;
when v does not divide B the last holds the B mod v remaining ones (tf_keras strides instead).
The q = B // v full ones are the first q·v examples viewed as `[q, v, ...]`, reduced over all but
the ghost and feature axes (group norm's per-sample layout); the remainder is an ordinary batch
(docs/decisions/021-ghost-batch-layout.md). Per ghost batch g and feature:

    x̂ = (x − μ_g) / sqrt(σ²_g + ε),    y = f(γ (r_g x̂ + d_g) + β)

with r_g = 1, d_g = 0 for batch norm; for renormalisation r_g = clip(σ_g / σ, 1/r_max, r_max),
d_g = clip((μ_g − μ) / σ, −d_max, d_max) against the shared renorm averages (μ, σ) (tf_keras
takes one r and d from the averaged ghost statistics). `normalize.py`'s gradient holds per ghost
batch, and dγ, dβ add up over them. The step itself is `training_step.py`'s.

Moving statistics, per feature, from the counts N_g, means μ_g and variances σ²_g (N = Σ N_g):

    mean          = Σ N_g μ_g / N                            (both rules)
    "batch"       variance = Σ N_g (σ²_g + (μ_g − mean)²) / N
    "ghost_mean"  variance = Σ N_g σ²_g / N

"batch" (the default) is the whole batch's exact variance (law of total variance), as one-batch
normalisation and `recalibrate` use; "ghost_mean", tf_keras' rule, leaves out the spread of the
ghost means (from means rounded to the input's precision: inexact for float32 data far from 0).
"""

import tensorflow as tf

from kerasbn.kernels.synchronized import combine_moments

MOVING_STATISTICS = ("batch", "ghost_mean")


def ghost_parts(x, virtual_batch_size):
    """`(full, remainder)`: the first q·v examples viewed as `[q, v, ...]` (q = B // v) and the
    last B mod v examples, shaped as `x`. Both always exist, possibly empty, so a kernel records
    the same residuals whether or not the batch size is known while tracing."""
    v = virtual_batch_size
    batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
    full_batches = batch // v
    head = full_batches * v
    shape = tf.concat([tf.reshape(full_batches, [1]), [v], tf.shape(x)[1:]], axis=0)
    full = tf.reshape(x[:head], shape)
    full.set_shape([full_batches if isinstance(batch, int) else None, v] + x.shape[1:].as_list())
    return full, x[head:]


def combine_ghosts(parts, feature_shape):
    """The whole batch's per-feature `mean`, `variance` (law of total variance), `ghost_variance`
    (Σ N_g σ²_g / N) and `count` (N), each of `feature_shape`, from its `training_step.Part`s."""
    counts, means, variances = (
        tf.concat([part.per_ghost(getattr(part, name), feature_shape) for part in parts], axis=0)
        for name in ("count", "mean", "variance")
    )
    total = tf.reduce_sum(counts, axis=0)
    divisor = tf.maximum(total, 1.0)
    mean = tf.reduce_sum(counts * means, axis=0) / divisor
    ghost_variance = tf.reduce_sum(counts * variances, axis=0) / divisor
    between = tf.reduce_sum(counts * tf.square(means - mean), axis=0) / divisor
    statistics = dict(
        mean=mean, variance=ghost_variance + between, ghost_variance=ghost_variance, count=total
    )
    return {name: tf.stop_gradient(value) for name, value in statistics.items()}


def moving_statistics_of(statistics, rule, shift, all_reduce=None):
    """Per-feature `(mean, variance, count)` the moving averages follow by `rule`, from
    `combine_ghosts`'s dict. With `all_reduce` (summing a list of tensors over replicas) they are
    the global batch's, in one all-reduce about `shift` (per feature, identical on every replica:
    the moving mean; see `synchronized.combine_moments`)."""
    mean, count = statistics["mean"], statistics["count"]
    variance = statistics["variance"] if rule == "batch" else statistics["ghost_variance"]
    if all_reduce is None:
        return mean, variance, count
    if rule == "batch":
        return combine_moments(mean, variance, count, shift, all_reduce)
    # Row 0 gives the global mean; row 1 is centred on the shift itself, so its combined
    # variance has no spread-of-means term: the pooled Σ N_i σ²_ghost,i / N.
    means, variances, counts = combine_moments(
        tf.stack([mean, shift]), tf.stack([variance, variance]), tf.stack([count, count]),
        tf.stack([shift, shift]), all_reduce,
    )
    return means[0], variances[1], counts[0]
