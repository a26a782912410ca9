"""Group normalisation (Wu & He 2018): `y = f(γ_c (x − μ_ng) / sqrt(σ²_ng + ε) + β_c)`.

The C channels form G groups of C/G consecutive channels, and each sample's group is normalised
over its channels and every other non-batch axis, so the output never depends on the batch size;
f is an optional fused activation. Every pass over `x` runs on its own layout with per-sample,
per-channel factors (each channel carrying its group's statistics): the sums are per sample and
channel over the other axes, pooled over each group's channels on tensors of one value per
sample and channel (`ChannelGroups.pool`), so the passes vectorise along the channels as batch
norm's do (docs/decisions/024-group-norm-on-the-input-layout.md). `normalize.py` holds the
formulas and the gradient, with that pooling.
"""

import tensorflow as tf

from kerasbn.kernels.engine import kernel
from kerasbn.kernels.moments import moments
from kerasbn.kernels.normalize import normalize_with_batch_statistics


class ChannelGroups:
    """The channels of axis `channel_axis` in `groups` groups of consecutive channels."""

    def __init__(self, groups, channel_axis):
        self.groups, self.channel_axis = groups, channel_axis

    def check(self, x):
        """`ValueError` unless `groups` (a Python int) is a positive divisor of `x`'s channels
        known while tracing. A tensor `groups` is not checked here (the layers pass ints, and the
        engine runs this check before it turns them into tensors)."""
        channels = x.shape[self.channel_axis]
        if isinstance(self.groups, int) and channels is not None:
            if self.groups <= 0 or channels % self.groups:
                raise ValueError(
                    f"Argument `groups` must divide the {channels} channels of the input. "
                    f"Received: groups={self.groups}"
                )

    def pool(self, values):
        """Per-channel `values` (size 1 on the axes summed over) to each channel's group total."""
        axis = self.channel_axis
        shape = tf.shape(values)
        split = tf.stack([self.groups, shape[axis] // self.groups])
        grouped = tf.reshape(values, tf.concat([shape[:axis], split, shape[axis + 1 :]], axis=0))
        total = tf.reduce_sum(grouped, axis=axis + 1, keepdims=True)
        pooled = tf.reshape(tf.broadcast_to(total, tf.shape(grouped)), shape)
        pooled.set_shape(values.shape)
        return pooled


def channel_parameter(param, rank, channel_axis, default, dtype):
    """A per-channel tensor shaped to broadcast against the input; None becomes a broadcastable
    scalar `default`."""
    shape = [1] * rank
    if param is None:
        return tf.fill(shape, tf.constant(default, dtype))
    shape[channel_axis] = -1
    return tf.reshape(param, shape)


def _check_groups(x, *args, groups, channel_axis, **kwargs):
    """Run by the engine before routing: inside the programs `groups` is a tensor."""
    del args, kwargs  # `group_norm`'s other arguments
    ChannelGroups(groups, channel_axis).check(x)


@kernel(per_layer_ints=("groups",), check=_check_groups)
def group_norm(x, gamma, beta, mask=None, *, build, groups, epsilon, channel_axis, activation=None):
    """Group-normalises `x` (float32 or float64), returning a tensor of its shape and dtype.
    `gamma`, `beta`: per-channel tensors or None (no scale / no offset). `mask`: optional boolean
    tensor of `x`'s shape without the channel axis; False positions leave the statistics.
    `groups`: int dividing the channels (the kernel's programs take it as a tensor, so one trace
    serves every group count). `epsilon`: Python float. `channel_axis`: non-negative int.
    `activation`: None or a name from `activations.ACTIVATIONS`."""
    rank = x.shape.rank
    channel_groups = ChannelGroups(groups, channel_axis)
    axes = tuple(axis for axis in range(1, rank) if axis != channel_axis)
    if mask is not None:
        mask = tf.expand_dims(tf.cast(mask, tf.bool), channel_axis)
    gamma = channel_parameter(gamma, rank, channel_axis, 1.0, x.dtype)
    beta = channel_parameter(beta, rank, channel_axis, 0.0, x.dtype)
    mean, variance, count = moments(x, axes, mask, build, pool=channel_groups.pool, stored=True)
    return normalize_with_batch_statistics(
        x, gamma, beta, mean, variance, count, epsilon=epsilon, axes=axes, build=build,
        pool=channel_groups.pool, mask=mask, activation=activation,
    )
