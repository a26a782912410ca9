"""Group normalisation (Wu & He 2018): `y = f(γ_c (x − μ_ng) / sqrt(σ²_ng + ε) + β_c)`.

The channel axis c is split into (groups, channels per group), and each sample's group normalised
over its channels and every other non-batch axis, so the output never depends on the batch size:
`normalize.normalize_with_batch_statistics` on the grouped view [N, ..., G, C/G], γ, β varying
along the member axis C/G (docs/decisions/020-group-norm-backward-sums.md); f is an optional
fused activation.
"""

import tensorflow as tf

from kerasbn.kernels.engine import kernel
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics


def static_reshape_target(shape):
    """`shape` (a `TensorShape`) as a list for `tf.reshape`, or None: at most one dimension may be
    unknown (it becomes -1), and then no known one may be 0 (-1 would be ambiguous)."""
    dims = shape.as_list()
    if dims.count(None) > 1 or 0 in dims:
        return None
    return [-1 if dim is None else dim for dim in dims]


def grouped_shape(x, groups, channel_axis):
    """`x`'s shape with its channel axis split into (groups, channels // groups): Python ints when
    known while tracing (fewer ops; `ValueError` unless `groups` is a positive divisor), else a tensor."""
    static = static_reshape_target(x.shape)
    channels = x.shape[channel_axis]
    if static is not None and channels is not None and isinstance(groups, int):
        if groups <= 0 or channels % groups:  # a reshape with -1 would absorb the mismatch
            raise ValueError(
                f"Argument `groups` must divide the {channels} channels of the input. "
                f"Received: groups={groups}"
            )
        return static[:channel_axis] + [groups, channels // groups] + static[channel_axis + 1 :]
    shape = tf.shape(x)
    split = tf.stack([groups, shape[channel_axis] // groups])
    return tf.concat([shape[:channel_axis], split, shape[channel_axis + 1 :]], axis=0)


def group_parameter(param, rank, groups, channel_axis, default, dtype):
    """A per-channel tensor shaped to broadcast against the grouped input; None becomes a
    broadcastable scalar `default`."""
    shape = [1] * (rank + 1)
    if param is None:
        return tf.fill(shape, tf.constant(default, dtype))
    shape[channel_axis : channel_axis + 2] = [groups, -1]
    return tf.reshape(param, shape)


@kernel(per_layer_ints=("groups",))
def group_norm(x, gamma, beta, mask=None, *, build, groups, epsilon, channel_axis, activation=None):
    """Group-normalises `x` (float32 or float64), returning a tensor of its shape and dtype.
    `gamma`, `beta`: per-channel tensors or None (no scale / no offset). `mask`: optional boolean
    tensor of `x`'s shape without the channel axis; False positions leave the statistics.
    `groups`: int dividing the channels (the kernel's programs take it as a tensor, so one trace
    serves every group count). `epsilon`: Python float. `channel_axis`: non-negative int.
    `activation`: None or a name from `activations.ACTIVATIONS`."""
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
        grouped, gamma, beta, mean, variance, count, epsilon=epsilon, axes=axes, build=build,
        member_axes=(member_axis,), mask=mask, activation=activation,
    )
    return tf.reshape(y, original_shape)
