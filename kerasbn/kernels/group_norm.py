"""Group normalisation (Wu & He 2018).

The channel axis c of `x` is split into (groups, channels per group); each
sample's group is normalised over its channels and every other non-batch axis:

    x̂ = (x − μ_ng) / sqrt(σ²_ng + ε),    z = γ_c x̂ + β_c,    y = f(z)

with f an optional fused activation. That is batch norm's normalisation on the
grouped view [N, ..., G, C/G] with one statistic per sample and group and γ, β
varying along the member axis C/G: `normalize.normalize_with_batch_statistics`
with `member_axes`, forward and hand-derived backward. The statistics are per
sample: the output never depends on the batch size.
"""

import tensorflow as tf

from kerasbn.kernels.engine import kernel
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics


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
def group_norm(x, gamma, beta, mask=None, *, build, groups, epsilon, channel_axis, activation=None):
    """Group-normalises `x`.

    Args:
      x: float tensor (float32 or float64), channel axis `channel_axis`.
      gamma, beta: per-channel tensors, or None for no scale / no offset.
      mask: optional boolean tensor of `x`'s shape without the channel axis;
        False positions are excluded from the statistics.
      build: the `Build` the route made (see `build.py`).
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
    if mask is not None:
        mask = tf.expand_dims(tf.expand_dims(tf.cast(mask, tf.bool), channel_axis), channel_axis)
    gamma = group_parameter(gamma, rank, groups, channel_axis, 1.0, x.dtype)
    beta = group_parameter(beta, rank, groups, channel_axis, 0.0, x.dtype)
    mean, variance, count = moments(grouped, axes, mask, build)
    y = normalize_with_batch_statistics(
        grouped,
        gamma,
        beta,
        mean,
        variance,
        count,
        epsilon=epsilon,
        axes=axes,
        build=build,
        member_axes=(member_axis,),
        mask=mask,
        activation=activation,
    )
    return tf.reshape(y, original_shape)
