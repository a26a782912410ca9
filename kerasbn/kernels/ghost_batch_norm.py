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
`moments.GROUP_MATMUL_LIMIT` ghost batches, arranged as batch norm's sums). The remainder is an ordinary
batch. Per ghost batch g and feature, with N_g elements:

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

from kerasbn.kernels.axes import mask_to_broadcast, reduction_axes, to_broadcast
from kerasbn.kernels.batch_norm import (
    affine_parameters,
    statistics_are_usable,
    updated_moving_statistics,
)
from kerasbn.kernels.batch_renorm import renorm_corrections, updated_renorm_statistics
from kerasbn.kernels.compile import kernel
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics
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


class _Part:
    """One piece of the batch normalised with its own statistics per ghost batch.

    `values` is `[q, v, ...]` (the full ghost batches; `ghost_axis` True) or an
    ordinary batch (the remainder, a single ghost batch).
    """

    def __init__(self, values, mask, feature_axes, ghost_axis):
        shift = 1 if ghost_axis else 0
        self.values = values
        # Known to hold no example while tracing: left out of the output.
        self.empty = values.shape[0] == 0
        self.mask = mask
        self.ghost_axis = ghost_axis
        self.feature_axes = tuple(axis + shift for axis in feature_axes)
        self.axes = tuple(
            axis for axis in reduction_axes(values.shape.rank, self.feature_axes) if axis >= shift
        )
        self.mean, self.variance, self.count = moments(values, self.axes, mask)

    def examples(self):
        """Number of examples in this part, as a tensor."""
        shape = tf.shape(self.values)
        return shape[0] * shape[1] if self.ghost_axis else shape[0]

    def broadcast(self, parameter):
        """A per-feature tensor in the input's broadcast shape, for this part."""
        return tf.expand_dims(parameter, 0) if self.ghost_axis else parameter

    def per_ghost(self, value, feature_shape):
        """`[ghost batches, *feature_shape]` from a statistic in broadcast shape."""
        value = tf.broadcast_to(value, tf.shape(self.mean))
        if self.ghost_axis:
            ghosts = tf.shape(self.values)[:1]
        else:
            ghosts = [1]
        return tf.reshape(value, tf.concat([ghosts, feature_shape], axis=0))

    def normalize(self, gamma, beta, *, epsilon, corrections, activation):
        r = d = None
        if corrections is not None:
            r, d = corrections(self.mean, self.variance, self.count, self.broadcast)
        return normalize_with_batch_statistics(
            self.values,
            self.broadcast(gamma),
            self.broadcast(beta),
            self.mean,
            self.variance,
            self.count,
            epsilon=epsilon,
            axes=self.axes,
            mask=self.mask,
            r=r,
            d=d,
            activation=activation,
        )


def _combine(parts, feature_shape):
    """Per-feature statistics of the whole batch from its ghost batches.

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


@kernel
def ghost_normalization(
    x,
    gamma,
    beta,
    mask=None,
    renorm=None,
    *,
    epsilon,
    feature_axes,
    virtual_batch_size,
    activation=None,
):
    """Normalises each ghost batch of `x` with its own statistics.

    Args:
      x: float tensor of rank 2 or more (float32 or float64), batch axis 0.
      gamma, beta: per-feature tensors, or None for no scale / no offset.
      mask: optional boolean tensor of `x`'s shape without the feature axes.
      renorm: None for batch norm, or for batch renormalisation a dict of
        per-feature `renorm_mean`, `renorm_stddev` and scalar `r_max`,
        `d_max` (corrections per ghost batch, see the module docstring).
      epsilon: Python float.
      feature_axes: sorted tuple of non-negative feature axes (0 excluded).
      virtual_batch_size: Python int >= 1, examples per ghost batch.
      activation: None, or the name of a fused activation
        (`activations.ACTIVATIONS`).

    Returns:
      `(y, statistics)`: the output (shape and dtype of `x`), and the
      whole batch's per-feature `mean`, `variance`, `ghost_variance` and
      `count` (see `_combine`), without gradient.
    """
    rank = x.shape.rank
    if mask is not None:
        mask = mask_to_broadcast(mask, rank, feature_axes)
    feature_shape = tf.gather(tf.shape(x), list(feature_axes))
    gamma_b, beta_b = affine_parameters(x, gamma, beta, feature_axes, feature_shape)
    x_parts = ghost_parts(x, virtual_batch_size)
    mask_parts = (None, None) if mask is None else ghost_parts(mask, virtual_batch_size)
    parts = [
        _Part(values, part_mask, feature_axes, ghost_axis)
        for values, part_mask, ghost_axis in zip(x_parts, mask_parts, (True, False))
    ]
    corrections = None
    if renorm is not None:
        corrections = _renorm_corrections(renorm, x, feature_axes, epsilon)
    # Parts known to be empty are left out (no concatenation when v divides a
    # known batch size); an empty batch keeps its (empty) remainder.
    filled = [part for part in parts if not part.empty] or parts[1:]
    outputs = []
    for part in filled:
        y = part.normalize(
            gamma_b, beta_b, epsilon=epsilon, corrections=corrections, activation=activation
        )
        # Back to examples along axis 0 (the row count given: -1 is ambiguous when empty).
        outputs.append(tf.reshape(y, tf.concat([[part.examples()], tf.shape(x)[1:]], axis=0)))
    y = outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)
    y.set_shape(x.shape)
    return y, _combine(parts, feature_shape)


def _renorm_corrections(renorm, x, feature_axes, epsilon):
    """`corrections(mean, variance, count, broadcast) -> (r, d)` per ghost batch."""
    rank = x.shape.rank
    reference_mean = to_broadcast(renorm["renorm_mean"], rank, feature_axes)
    reference_stddev = to_broadcast(renorm["renorm_stddev"], rank, feature_axes)

    def corrections(mean, variance, count, broadcast):
        usable = tf.broadcast_to(statistics_are_usable(mean, variance, count), tf.shape(mean))
        return renorm_corrections(
            mean,
            variance,
            broadcast(reference_mean),
            broadcast(reference_stddev),
            usable,
            tf.cast(renorm["r_max"], x.dtype),
            tf.cast(renorm["d_max"], x.dtype),
            epsilon,
        )

    return corrections


def moving_statistics_of(statistics, rule, shift, all_reduce=None):
    """Per-feature `(mean, variance, count)` the moving averages follow.

    Args:
      statistics: the dict `ghost_normalization` returns.
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


def ghost_batch_norm_train(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    mask=None,
    *,
    momentum,
    epsilon,
    feature_axes,
    virtual_batch_size,
    moving_statistics="batch",
    activation=None,
    all_reduce=None,
    jit_compile=True,
    shape_use=None,
):
    """One training step of ghost batch normalisation.

    Arguments and results as `batch_norm.batch_norm_train`, plus
    `virtual_batch_size` and `moving_statistics` (the rule, see the module
    docstring), `all_reduce` (synchronized moving statistics, see
    `moving_statistics_of`), and `jit_compile`, `shape_use` for the
    normalisation kernel (`compile.Kernel.get`). Ghost batches never span
    replicas: only the moving statistics are combined across them.
    """
    normalization = ghost_normalization.get(jit_compile, shape_use)
    y, statistics = normalization(
        x,
        gamma,
        beta,
        mask,
        None,
        epsilon=epsilon,
        feature_axes=feature_axes,
        virtual_batch_size=virtual_batch_size,
        activation=activation,
    )
    mean, variance, count = moving_statistics_of(
        statistics, moving_statistics, moving_mean, all_reduce
    )
    new_mean, new_variance = updated_moving_statistics(
        moving_mean, moving_variance, mean, variance, count, momentum
    )
    return y, new_mean, new_variance


def ghost_batch_renorm_train(
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
    virtual_batch_size,
    moving_statistics="batch",
    activation=None,
    all_reduce=None,
    jit_compile=True,
    shape_use=None,
):
    """One training step of batch renormalisation with ghost batches.

    Arguments and results as `batch_renorm.batch_renorm_train`, plus those of
    `ghost_batch_norm_train`. r and d are taken per ghost batch against the
    renorm averages; every moving statistic follows the whole batch's
    statistics under `moving_statistics`.
    """
    normalization = ghost_normalization.get(jit_compile, shape_use)
    renorm = {
        "renorm_mean": state["renorm_mean"],
        "renorm_stddev": state["renorm_stddev"],
        "r_max": r_max,
        "d_max": d_max,
    }
    y, statistics = normalization(
        x,
        gamma,
        beta,
        mask,
        renorm,
        epsilon=epsilon,
        feature_axes=feature_axes,
        virtual_batch_size=virtual_batch_size,
        activation=activation,
    )
    mean, variance, count = moving_statistics_of(
        statistics, moving_statistics, state["moving_mean"], all_reduce
    )
    new_state = updated_renorm_statistics(
        state,
        mean,
        variance,
        statistics_are_usable(mean, variance, count),
        momentum=momentum,
        renorm_momentum=renorm_momentum,
        epsilon=epsilon,
    )
    return y, new_state
