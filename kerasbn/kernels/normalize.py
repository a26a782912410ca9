"""Normalisation with batch statistics and its hand-derived gradient.

Forward, per feature:   x̂ = (x - μ_B) / sqrt(σ²_B + ε),   z = γ (r x̂ + d) + β,
y = f(z), where (r, d) are Ioffe's batch-renormalisation corrections (constants
for the gradient: no gradient flows through them), r = 1, d = 0 for plain batch
norm, and f is an optional fused activation (the identity by default).

Backward, with N elements per feature, S1 = Σ dy and S2 = Σ dy x̂ (one pass over
dy and x):
    dβ = S1
    dγ = r S2 + d S1
    dx = γ r / sqrt(σ²_B + ε) · (dy - S1/N - x̂ S2/N)
With a mask w (1 where a position counts, N = Σ w), the statistics only see
unmasked positions, so only they receive the terms through μ_B and σ_B; but every
output, masked or not, depends on μ_B and σ_B, so S1 and S2 still sum over all
positions:
    dx = γ r / sqrt(σ²_B + ε) · (dy - w (S1/N + x̂ S2/N))

With a fused activation, dy below stands for dz = dy · f'(z). Built for XLA, z
is recomputed from x inside the loops that read x anyway, so the activation
costs no pass of its own; a graph run op by op keeps z (`kept_for_backward`).

A feature with no element (empty or fully masked batch) has its inverse standard
deviation set to 0: x̂ = 0, y = β and dx = 0 there instead of NaN.

With statistics per ghost batch (`ghost_batch_norm.py`), μ_B, σ_B, N, S1, S2,
r and d vary along a ghost axis over which γ and β are broadcast: the formulas
above hold per ghost batch, and dγ, dβ are summed over the ghost axis.

Group norm (`group_norm.py`) is the same computation on the grouped view
[N, ..., G, C/G]: one statistic per sample and group, and γ, β varying along
the member axis C/G inside each statistic. With g = γ r dy the formulas hold
as dx = (g - S1/N - x̂ S2/N) / sqrt(σ² + ε), S1 = Σ g, S2 = Σ g x̂, which the
backward computes from the per-channel sums A = Σ dy, B = Σ dy x̂ over the
other axes (S1 = Σ_member γ r A, S2 = Σ_member γ r B); for batch norm there
is no member axis and these are the formulas above.

With statistics synchronised across replicas, N, S1 and S2 in dx are global: an
`all_reduce` callable sums (S1, S2) over replicas, while dβ and dγ stay local
(the distribution strategy sums the weight gradients itself).

Every per-element expression is written as one multiply-add per feature
constant, `(x - μ) k + c`, with the per-feature constants computed first, so
XLA fuses each pass over `x` into a single loop and `x̂` is never stored; the
sums go through `moments.sum_over` (see there why).
"""

import tensorflow as tf

from kerasbn.kernels import tf_internals
from kerasbn.kernels.activations import activate, activation_gradient
from kerasbn.kernels.moments import at_least_one, known_count, sum_over, sum_pair


def inverse_std(variance, count, epsilon):
    """`1 / sqrt(σ² + ε)`, and 0 for a feature without elements."""
    known = known_count(count)
    if known is not None and known > 0:
        return tf.math.rsqrt(variance + epsilon)
    return tf.where(count > 0, tf.math.rsqrt(variance + epsilon), tf.zeros_like(variance))


def affine_factors(gamma, beta, inv_std, r=None, d=None):
    """Per-feature `(scale, shift)` with `γ (r (x - μ) inv_std + d) + β = (x - μ) scale + shift`."""
    # γ (r (x - μ) s + d) + β = (x - μ) (γ r s) + (γ d + β)
    scale = gamma * inv_std if r is None else gamma * r * inv_std
    shift = beta if d is None else gamma * d + beta
    return scale, shift


def normalize_forward(x, gamma, beta, mean, inv_std, r=None, d=None, activation=None):
    """`f(γ (r (x - μ) inv_std + d) + β)`, one fused pass over `x`.

    All per-feature arguments are shaped to broadcast against `x`; `activation`
    is None or a name from `activations.ACTIVATIONS`.
    """
    return activate(pre_activation(x, gamma, beta, mean, inv_std, r, d), activation)


def pre_activation(x, gamma, beta, mean, inv_std, r=None, d=None):
    """`z = γ (r (x - μ) inv_std + d) + β`, before the fused activation."""
    scale, shift = affine_factors(gamma, beta, inv_std, r, d)
    return (x - mean) * scale + shift


def kept_for_backward(z, activation, build):
    """The pre-activation `z` the backward reads, or None to recompute it from `x`.

    XLA fuses the recomputation into the backward's passes over `x`, so
    nothing is kept; run op by op, recomputing is three more passes over
    memory, so a graph not built for XLA keeps `z`, as Keras' separate
    activation layer does.
    """
    return z if activation is not None and not build.for_xla else None


def normalize_backward(
    dy,
    x,
    gamma,
    beta,
    mean,
    inv_std,
    count,
    *,
    axes,
    build,
    member_axes=(),
    mask=None,
    r=None,
    d=None,
    all_reduce=None,
    activation=None,
    z=None,
):
    """Gradients `(dx, dγ, dβ)` of `normalize_forward` through the batch statistics.

    Args:
      dy: gradient of the output, shape of `x`.
      x, gamma, beta, mean, inv_std, count, r, d: as in the forward (broadcast
        shape).
      axes: the reduced axes.
      build: the `Build` (how the sums are arranged, which gradient ops).
      member_axes: the reduced axes along which γ and β vary (group norm's
        channels within a group); () when they are constant per statistic.
      mask: optional boolean tensor broadcastable to `x`.
      all_reduce: optional callable summing a list of tensors over replicas.
      activation: the fused activation's name, or None.
      z: the forward's pre-activation (`kept_for_backward`), or None to
        recompute it from `x`.

    Returns:
      `dx` (shape of `x`) and `dγ`, `dβ` in the broadcast shape of `gamma` and
      `beta` (summed over the axes along which the statistics vary and the
      parameters are broadcast: the ghost axis, group norm's samples).
    """
    divisor = at_least_one(count)
    scale, _ = affine_factors(gamma, beta, inv_std, r, d)
    if activation is not None:
        # dz = dy f'(z); recomputed, z costs XLA nothing: it fuses into both passes below.
        if z is None:
            z = pre_activation(x, gamma, beta, mean, inv_std, r, d)
        dy = activation_gradient(dy, z, activation, build)
    # Per statistic and parameter position, one pass over dy and x:
    # A = Σ dy and B = Σ dy x̂ = inv_std Σ dy (x - μ).
    parameter_axes = tuple(axis for axis in axes if axis not in member_axes)
    sum_dy, sum_dy_centred = sum_pair(dy, dy * (x - mean), parameter_axes, build)
    sum_dy_xhat = sum_dy_centred * inv_std
    # With g = γ r dy: S1 = Σ g = Σ_members γ r A and S2 = Σ g x̂ = Σ_members γ r B.
    factor = gamma if r is None else gamma * r
    s1, s2 = factor * sum_dy, factor * sum_dy_xhat
    if member_axes:
        s1, s2 = sum_over(s1, member_axes, build), sum_over(s2, member_axes, build)
    if all_reduce is not None:
        s1, s2 = all_reduce([s1, s2])
    # dx = inv_std (g - S1/N - x̂ S2/N) = dy scale - [(x - μ) a + b],
    # a = inv_std² S2/N,  b = inv_std S1/N  (per statistic).
    slope = inv_std * inv_std * (s2 / divisor)
    offset = inv_std * (s1 / divisor)
    statistics_term = (x - mean) * slope + offset
    if mask is not None:
        statistics_term = tf.where(mask, statistics_term, tf.zeros_like(statistics_term))
    dx = dy * scale - statistics_term
    dgamma = sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy
    return dx, sum_to_shape_of(dgamma, gamma), sum_to_shape_of(sum_dy, beta)


def sum_to_shape_of(gradient, parameter):
    """Sums a per-feature gradient over the axes where `parameter` is broadcast.

    A no-op for batch statistics (one per feature, as the parameter); with
    statistics per ghost batch, the sum over the ghost axis.
    """
    axes = [
        axis
        for axis, (size, parameter_size) in enumerate(zip(gradient.shape, parameter.shape))
        if parameter_size == 1 and size != 1
    ]
    return tf.reduce_sum(gradient, axis=axes, keepdims=True) if axes else gradient


def normalize_with_batch_statistics(
    x,
    gamma,
    beta,
    mean,
    variance,
    count,
    *,
    epsilon,
    axes,
    build,
    member_axes=(),
    mask=None,
    r=None,
    d=None,
    all_reduce=None,
    activation=None,
):
    """Returns `f(γ (r x̂ + d) + β)` with a custom gradient.

    Args:
      x: float tensor.
      gamma, beta: per-feature tensors already shaped to broadcast against `x`.
      mean, variance, count: outputs of `moments(x, axes, mask, build)`
        (under stop_gradient, except with `build.differentiable`).
      epsilon: Python float added to the variance.
      axes: tuple of reduced axes.
      build: the `Build`; with `differentiable`, plain autodiff ops.
      member_axes: reduced axes along which γ and β vary (group norm's
        channels within a group), see `normalize_backward`.
      mask: optional boolean tensor broadcastable to `x`.
      r, d: optional broadcastable renormalisation corrections (treated as
        constants).
      all_reduce: optional callable summing a list of tensors over replicas;
        given when `count`, `mean` and `variance` are global statistics.
      activation: None, or the name of an activation applied to the result
        (see `activations.ACTIVATIONS`), fused forward and backward.

    Returns:
      The normalised tensor, same shape and dtype as `x`.
    """
    inv_std = inverse_std(variance, count, epsilon)
    if r is not None:
        r = tf.stop_gradient(r)
        d = tf.stop_gradient(d)
    if build.differentiable:  # exact to any order: autodiff of the formula
        return normalize_forward(x, gamma, beta, mean, inv_std, r, d, activation)

    @tf.custom_gradient
    def forward(x, gamma, beta):
        z = pre_activation(x, gamma, beta, mean, inv_std, r, d)
        y = activate(z, activation)
        z = kept_for_backward(z, activation, build)

        def grad(dy):
            # Without the private API to tell, first-order training must go on.
            if all_reduce is not None and tf_internals.gradient_recorded([x, dy], unknown=False):
                raise NotImplementedError(
                    "A gradient of a gradient (gradient penalty, Hessian-vector product) "
                    "through a layer with synchronized=True is not supported: its hand-derived "
                    "gradient treats the global batch statistics as constants. Use "
                    "synchronized=False for such models."
                )
            return normalize_backward(
                dy,
                x,
                gamma,
                beta,
                mean,
                inv_std,
                count,
                axes=axes,
                build=build,
                member_axes=member_axes,
                mask=mask,
                r=r,
                d=d,
                all_reduce=all_reduce,
                activation=activation,
                z=z,
            )

        return y, grad

    return forward(x, gamma, beta)
