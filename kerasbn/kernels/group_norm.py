"""Group normalisation (Wu & He 2018) and its hand-derived gradient.

The channel axis c of `x` is split into (groups, channels per group); each
sample's group is normalised over its channels and every other non-batch axis:

    x̂ = (x − μ_ng) / sqrt(σ²_ng + ε),    y = γ_c x̂ + β_c

Backward, per sample n and group g with N elements, writing g = dy γ_c:

    dx = (g − S1/N − x̂ S2/N) / sqrt(σ²_ng + ε),   S1 = Σ g,  S2 = Σ g x̂
    dγ_c = Σ_{n, other axes} dy x̂,                dβ_c = Σ_{n, other axes} dy

Unlike batch norm, γ varies inside a group, so S1 and S2 carry γ. With a mask
(positions w = 1 that count), the statistics use unmasked positions only and
only they receive the S1, S2 terms (S1, S2 still sum over every position of the
group, since every output depends on μ and σ):
    dx = (g − w (S1/N + x̂ S2/N)) / sqrt(σ²_ng + ε).
The statistics are per sample: the output never depends on the batch size.
"""

import tensorflow as tf

from kerasbn.kernels.compile import kernel
from kerasbn.kernels.moments import moments


def grouped_shape(x, groups, channel_axis):
    """Shape of `x` with its channel axis split into (groups, channels // groups)."""
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


@kernel
def group_norm(x, gamma, beta, mask=None, *, groups, epsilon, channel_axis):
    """Group-normalises `x`.

    Args:
      x: float tensor (float32 or float64), channel axis `channel_axis`.
      gamma, beta: per-channel tensors, or None for no scale / no offset.
      mask: optional boolean tensor of `x`'s shape without the channel axis;
        False positions are excluded from the statistics.
      groups: Python int dividing the number of channels.
      epsilon: Python float.
      channel_axis: non-negative int.

    Returns:
      A tensor of `x`'s shape and dtype.
    """
    rank = x.shape.rank
    original_shape = tf.shape(x)
    grouped = tf.reshape(x, grouped_shape(x, groups, channel_axis))
    axes = tuple(a for a in range(rank + 1) if a not in (0, channel_axis))
    parameter_axes = tuple(a for a in range(rank + 1) if a not in (channel_axis, channel_axis + 1))
    if mask is not None:
        mask = tf.expand_dims(tf.expand_dims(tf.cast(mask, tf.bool), channel_axis), channel_axis)
    gamma = group_parameter(gamma, rank, groups, channel_axis, 1.0, x.dtype)
    beta = group_parameter(beta, rank, groups, channel_axis, 0.0, x.dtype)
    mean, variance, count = moments(tf.stop_gradient(grouped), axes, mask)
    inv_std = tf.where(count > 0, tf.math.rsqrt(variance + epsilon), tf.zeros_like(variance))
    divisor = tf.maximum(count, 1.0)

    @tf.custom_gradient
    def forward(grouped, gamma, beta):
        x_hat = (grouped - mean) * inv_std
        y = x_hat * gamma + beta

        def grad(dy):
            x_hat = (grouped - mean) * inv_std
            scaled = dy * gamma
            sum_scaled = tf.reduce_sum(scaled, axis=axes, keepdims=True)
            sum_scaled_xhat = tf.reduce_sum(scaled * x_hat, axis=axes, keepdims=True)
            statistics_term = (sum_scaled + x_hat * sum_scaled_xhat) / divisor
            if mask is not None:
                statistics_term = tf.where(mask, statistics_term, tf.zeros_like(statistics_term))
            dx = inv_std * (scaled - statistics_term)
            dgamma = tf.reduce_sum(dy * x_hat, axis=parameter_axes, keepdims=True)
            dbeta = tf.reduce_sum(dy, axis=parameter_axes, keepdims=True)
            return dx, _reduce_to(dgamma, gamma), _reduce_to(dbeta, beta)

        return y, grad

    return tf.reshape(forward(grouped, gamma, beta), original_shape)


def _reduce_to(gradient, param):
    """Sums a per-channel gradient down to the stand-in's shape when it was absent."""
    if param.shape.num_elements() == 1:
        return tf.reshape(tf.reduce_sum(gradient), tf.shape(param))
    return gradient
