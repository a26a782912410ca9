"""Normalisation with batch statistics and its hand-derived gradient.

Forward, per feature:   x̂ = (x - μ_B) / sqrt(σ²_B + ε),   z = γ (r x̂ + d) + β,   y = f(z),
with (r, d) Ioffe's renormalisation corrections (constants for the gradient; r = 1, d = 0 for
batch norm) and f an optional fused activation (the identity by default).

Backward, with N elements per feature, S1 = Σ dy and S2 = Σ dy x̂ (one pass over dy and x):
    dβ = S1
    dγ = r S2 + d S1
    dx = γ r / sqrt(σ²_B + ε) · (dy - S1/N - x̂ S2/N)
With a mask w (1 where a position counts, N = Σ w) only unmasked positions receive the terms
through μ_B and σ_B, but every output depends on them, so S1 and S2 sum over all positions:
    dx = γ r / sqrt(σ²_B + ε) · (dy - w (S1/N + x̂ S2/N))
With a fused activation dy stands for dz = dy · f'(z). A feature without elements has inverse
standard deviation 0: x̂ = 0, y = β and dx = 0 there, not NaN.

With ghost batches (`ghost_batch_norm.py`) the formulas hold per ghost batch. In group norm
(`group_norm.py`) the channels of a group share one statistic (each carries it) while γ, β vary
per channel; with g = γ r dy, dx = (g - S1/N - x̂ S2/N) / sqrt(σ² + ε), S1 = Σ g = pool(γ r A),
S2 = Σ g x̂ = pool(γ r B), from the per-channel sums A = Σ dy, B = Σ dy x̂ and `pool` adding
them up over the channels of each group. Synchronised statistics: N, S1 and S2 in dx are
global (`all_reduce` sums (S1, S2) over replicas), dβ and dγ stay local (the distribution
strategy sums weight gradients itself).

Each per-element expression is one multiply-add per feature constant, `(x - μ) k + c`, so XLA
fuses each pass over `x` into one loop and `x̂` is never stored; sums use `moments.sum_over`.
"""

import tensorflow as tf

from kerasbn.kernels import tf_internals
from kerasbn.kernels.activations import activate, activation_gradient, gradient_from_kept, kept_for_gradient
from kerasbn.kernels.moments import at_least_one, known_count, sum_pair
from kerasbn.kernels.synchronized import SECOND_ORDER_SYNCHRONIZED


def inverse_std(variance, count, epsilon):
    """`1 / sqrt(σ² + ε)`, and 0 for a feature without elements."""
    known = known_count(count)
    if known is not None and known > 0:
        return tf.math.rsqrt(variance + epsilon)
    return tf.where(count > 0, tf.math.rsqrt(variance + epsilon), tf.zeros_like(variance))


def affine_factors(gamma, beta, inv_std, r=None, d=None):
    """Per-feature `(scale, shift)`: `γ (r (x - μ) inv_std + d) + β = (x - μ) scale + shift`."""
    scale = gamma * inv_std if r is None else gamma * r * inv_std
    shift = beta if d is None else gamma * d + beta
    return scale, shift


def pre_activation(x, gamma, beta, mean, inv_std, r=None, d=None):
    """`z = γ (r (x - μ) inv_std + d) + β`, before the fused activation, in one pass; per-feature
    arguments broadcast against `x`."""
    scale, shift = affine_factors(gamma, beta, inv_std, r, d)
    return (x - mean) * scale + shift


def normalize_backward(
    dy, x, gamma, beta, mean, inv_std, count, *, axes, build, pool=None, mask=None, r=None,
    d=None, all_reduce=None, activation=None, kept=None
):
    """Gradients `(dx, dγ, dβ)` of `f(pre_activation(...))` through the batch statistics, `dγ`, `dβ`
    of the shapes of `gamma` and `beta`. Arguments as in `normalize_with_batch_statistics`
    (`inv_std` for variance and epsilon); `kept` is `activations.kept_for_gradient`'s."""
    divisor = at_least_one(count)
    scale, _ = affine_factors(gamma, beta, inv_std, r, d)
    if activation is not None and kept is not None:  # dz = dy f'(z)
        dy = gradient_from_kept(dy, kept, activation)
    elif activation is not None:  # a recomputed z fuses into both passes below
        z = pre_activation(x, gamma, beta, mean, inv_std, r, d)
        dy = activation_gradient(dy, z, activation)
    # Per feature, one pass: A = Σ dy, B = Σ dy x̂ = inv_std Σ dy (x - μ).
    sum_dy, sum_dy_centred = sum_pair(dy, dy * (x - mean), axes, build)
    sum_dy_xhat = sum_dy_centred * inv_std
    factor = gamma if r is None else gamma * r
    s1, s2 = factor * sum_dy, factor * sum_dy_xhat
    if pool is not None:
        s1, s2 = pool(s1), pool(s2)
    if all_reduce is not None:
        s1, s2 = all_reduce([s1, s2])
    # dx = inv_std (g - S1/N - x̂ S2/N) = dy scale - [(x - μ) slope + offset], per statistic.
    slope = inv_std * inv_std * (s2 / divisor)
    offset = inv_std * (s1 / divisor)
    statistics_term = (x - mean) * slope + offset
    if mask is not None:
        statistics_term = tf.where(mask, statistics_term, tf.zeros_like(statistics_term))
    dx = dy * scale - statistics_term
    dgamma = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
    return dx, sum_to_shape_of(dgamma, gamma), sum_to_shape_of(sum_dy, beta)


def sum_to_shape_of(gradient, parameter):
    """Sums a per-feature gradient over the axes where `parameter` is broadcast (the ghost axis
    with statistics per ghost batch; a no-op with one statistic per feature)."""
    pairs = enumerate(zip(gradient.shape, parameter.shape))
    axes = [axis for axis, (size, parameter_size) in pairs if parameter_size == 1 and size != 1]
    return tf.reduce_sum(gradient, axis=axes, keepdims=True) if axes else gradient


def normalize_with_batch_statistics(
    x, gamma, beta, mean, variance, count, *, epsilon, axes, build, pool=None, mask=None,
    r=None, d=None, all_reduce=None, activation=None
):
    """`f(γ (r x̂ + d) + β)`, of `x`'s shape and dtype, with the hand-derived gradient. `gamma`,
    `beta`, `r`, `d` (optional corrections, constants) broadcast against `x`; `mean`, `variance`,
    `count` are `moments(x, axes, mask, build, pool)`'s (with `build.differentiable` all is plain
    autodiff, exact to any order). `epsilon`: Python float; `axes`: the reduced axes.
    `pool`: None, or `moments`' (statistics shared by several features, each carrying them). `mask`:
    optional boolean tensor broadcastable to `x`. `all_reduce`: optional callable summing a list
    of tensors over replicas, given with global statistics (a gradient of its gradient raises
    `NotImplementedError`). `activation`: None or a name from `activations.ACTIVATIONS`, fused
    forward and backward."""
    inv_std = inverse_std(variance, count, epsilon)
    if r is not None:
        r, d = tf.stop_gradient(r), tf.stop_gradient(d)
    if build.differentiable:
        return activate(pre_activation(x, gamma, beta, mean, inv_std, r, d), activation)

    @tf.custom_gradient
    def forward(x, gamma, beta):
        z = pre_activation(x, gamma, beta, mean, inv_std, r, d)
        y = activate(z, activation)
        kept = kept_for_gradient(z, y, activation, build)

        def grad(dy):
            # Without the private API to tell, first-order training must go on.
            if all_reduce is not None and tf_internals.gradient_recorded([x, dy], unknown=False):
                raise NotImplementedError(SECOND_ORDER_SYNCHRONIZED)
            return normalize_backward(
                dy, x, gamma, beta, mean, inv_std, count, axes=axes, build=build,
                pool=pool, mask=mask, r=r, d=d, all_reduce=all_reduce,
                activation=activation, kept=kept,
            )

        return y, grad

    return forward(x, gamma, beta)
