"""Group normalisation (Wu & He 2018) and its hand-derived gradient.

The channel axis c of `x` is split into (groups, channels per group); each
sample's group is normalised over its channels and every other non-batch axis:

    x̂ = (x − μ_ng) / sqrt(σ²_ng + ε),    z = γ_c x̂ + β_c,    y = f(z)

with f an optional fused activation (the identity by default; with one, dy
below stands for dz = dy · f'(z), z recomputed from x inside the passes that
read x anyway when built for XLA, kept from the forward otherwise).

Backward, per sample n and group g with N elements, writing g = dy γ_c:

    dx = (g − S1/N − x̂ S2/N) / sqrt(σ²_ng + ε),   S1 = Σ g,  S2 = Σ g x̂
    dγ_c = Σ_{n, other axes} dy x̂,                dβ_c = Σ_{n, other axes} dy

Unlike batch norm, γ varies inside a group, so S1 and S2 carry γ. With a mask
(positions w = 1 that count), the statistics use unmasked positions only and
only they receive the S1, S2 terms (S1, S2 still sum over every position of the
group, since every output depends on μ and σ):
    dx = (g − w (S1/N + x̂ S2/N)) / sqrt(σ²_ng + ε).
The statistics are per sample: the output never depends on the batch size.

Passes over the data: the statistics read x twice (mean, then the squared
deviations, see `moments`), the output once. The backward reads dy and x
once for the per-sample, per-channel sums A = Σ dy and B = Σ dy (x − μ) over
the other axes; S1, S2, dγ and dβ all follow from these small tensors
(S1 = Σ_c∈g γ_c A, S2 = Σ_c∈g γ_c B / σ, dγ = Σ_n B / σ, dβ = Σ_n A), then
once more for dx.
"""

import tensorflow as tf

from kerasbn.kernels.activations import activate, activation_gradient
from kerasbn.kernels.compile import kernel, statistics_are_differentiable
from kerasbn.kernels.moments import at_least_one, moments, sum_over, sum_pair
from kerasbn.kernels.normalize import inverse_std, kept_for_backward


def static_reshape_target(shape):
    """`shape` (a `TensorShape`) as a list for `tf.reshape`, or None if it cannot be.

    At most one dimension may be unknown (it becomes -1), and the known ones
    must not be 0, or -1 would be ambiguous.
    """
    dims = shape.as_list()
    if dims.count(None) > 1 or 0 in dims:
        return None
    return [-1 if dim is None else dim for dim in dims]


def grouped_shape(x, groups, channel_axis):
    """Shape of `x` with its channel axis split into (groups, channels // groups).

    A list of Python ints when it is known while tracing (fewer graph ops),
    else a tensor.
    """
    static = static_reshape_target(x.shape)
    channels = x.shape[channel_axis]
    if static is not None and channels is not None and isinstance(groups, int):
        if groups <= 0 or channels % groups:
            # With -1 in the target, a reshape would absorb the mismatch.
            raise ValueError(
                f"Argument `groups` must divide the {channels} channels of the input. "
                f"Received: groups={groups}"
            )
        return static[:channel_axis] + [groups, channels // groups] + static[channel_axis + 1 :]
    shape = tf.shape(x)
    per_group = shape[channel_axis] // groups
    return tf.concat(
        [shape[:channel_axis], tf.stack([groups, per_group]), shape[channel_axis + 1 :]], axis=0
    )


def group_parameter(param, rank, groups, channel_axis, default, dtype):
    """A per-channel tensor shaped to broadcast against the grouped input.

    An absent parameter (None) becomes a broadcastable scalar `default`.
    """
    if param is None:
        return tf.fill([1] * (rank + 1), tf.constant(default, dtype))
    shape = [1] * (rank + 1)
    shape[channel_axis] = groups
    shape[channel_axis + 1] = -1
    return tf.reshape(param, shape)


@kernel(per_layer_ints=("groups",))
def group_norm(x, gamma, beta, mask=None, *, groups, epsilon, channel_axis, activation=None):
    """Group-normalises `x`.

    Args:
      x: float tensor (float32 or float64), channel axis `channel_axis`.
      gamma, beta: per-channel tensors, or None for no scale / no offset.
      mask: optional boolean tensor of `x`'s shape without the channel axis;
        False positions are excluded from the statistics.
      groups: Python int (or int32 scalar tensor) dividing the number of
        channels. The kernel's programs take it as a tensor: one trace
        serves every group count.
      epsilon: Python float.
      channel_axis: non-negative int.
      activation: None, or the name of a fused activation applied to the
        output (`activations.ACTIVATIONS`).

    Returns:
      A tensor of `x`'s shape and dtype.
    """
    rank = x.shape.rank
    original_shape = static_reshape_target(x.shape) or tf.shape(x)
    grouped = tf.reshape(x, grouped_shape(x, groups, channel_axis))
    group_axis, member_axis = channel_axis, channel_axis + 1
    axes = tuple(a for a in range(rank + 1) if a not in (0, group_axis))
    parameter_axes = tuple(a for a in range(rank + 1) if a not in (group_axis, member_axis))
    # The axes other than the sample and the channel (spatial, time...).
    other_axes = tuple(a for a in range(rank + 1) if a not in (0, group_axis, member_axis))
    if mask is not None:
        mask = tf.expand_dims(tf.expand_dims(tf.cast(mask, tf.bool), channel_axis), channel_axis)
    gamma = group_parameter(gamma, rank, groups, channel_axis, 1.0, x.dtype)
    beta = group_parameter(beta, rank, groups, channel_axis, 0.0, x.dtype)
    mean, variance, count = moments(grouped, axes, mask)
    inv_std = inverse_std(variance, count, epsilon)
    divisor = at_least_one(count)

    def normalized(grouped, gamma, beta):
        # One fused pass: (x - μ) (γ / σ) + β with the factor per sample and channel.
        return (grouped - mean) * (gamma * inv_std) + beta

    if statistics_are_differentiable():  # for a gradient of the gradient
        return tf.reshape(activate(normalized(grouped, gamma, beta), activation), original_shape)

    @tf.custom_gradient
    def forward(grouped, gamma, beta):
        z = normalized(grouped, gamma, beta)
        y = activate(z, activation)
        kept = kept_for_backward(z, activation)

        def grad(dy):
            # Through the activation first: dz = dy f'(z).
            z = normalized(grouped, gamma, beta) if kept is None else kept
            dy = activation_gradient(dy, z, activation)
            # Per sample and channel, over the other axes (one pass over dy
            # and x; for rank 2 there is nothing to sum and these are dy
            # itself): A = Σ dy, B = Σ dy (x - μ). Every sum the gradient
            # needs follows from these small tensors.
            if other_axes:
                sum_dy, sum_dy_centred = sum_pair(dy, dy * (grouped - mean), other_axes)
            else:
                sum_dy, sum_dy_centred = dy, dy * (grouped - mean)
            dbeta = sum_over(sum_dy, parameter_axes)
            dgamma = sum_over(sum_dy_centred * inv_std, parameter_axes)
            # S1 = Σ_group γ dy,  S2 = Σ_group γ dy x̂, per sample and group.
            s1 = sum_over(gamma * sum_dy, (member_axis,))
            s2 = sum_over(gamma * sum_dy_centred, (member_axis,)) * inv_std
            # dx = (γ dy − (S1 + x̂ S2) / N) / σ
            #    = dy (γ / σ) − [(x − μ) (S2 / (N σ²)) + S1 / (N σ)]
            slope = s2 * inv_std * inv_std / divisor
            offset = s1 * inv_std / divisor
            statistics_term = (grouped - mean) * slope + offset
            if mask is not None:
                statistics_term = tf.where(mask, statistics_term, tf.zeros_like(statistics_term))
            dx = dy * (gamma * inv_std) - statistics_term
            return dx, _reduce_to(dgamma, gamma), _reduce_to(dbeta, beta)

        return y, grad

    return tf.reshape(forward(grouped, gamma, beta), original_shape)


def _reduce_to(gradient, param):
    """Sums a per-channel gradient down to the stand-in's shape when it was absent."""
    if param.shape.num_elements() == 1:
        return tf.reshape(tf.reduce_sum(gradient), tf.shape(param))
    return gradient
