"""`kerasbn.GroupNorm`: group normalization (Wu & He 2018)."""

import numbers

import keras
import tensorflow as tf

from kerasbn import kernels
from kerasbn.layers import arguments, composite
from kerasbn.layers.precision import read_variable, statistics_dtype
from kerasbn.layers.weights import add_affine_weights, affine_config, set_affine_arguments


@keras.saving.register_keras_serializable(package="kerasbn")
class GroupNorm(composite.CompositeInputs, keras.layers.Layer):
    """Group normalization with an XLA-compiled kernel and a hand-derived gradient.

    The channels are split into `groups` groups, and each sample is normalized
    over each of its groups (the group's channels and all spatial positions):
    `y = gamma * (x - mean) / sqrt(var + epsilon) + beta`, with per-channel
    `gamma` and `beta`. The statistics belong to one sample, so the layer has no
    moving statistics, behaves the same in training and inference, and its
    output for a sample never depends on the rest of the batch. Prefer it to
    batch norm when batches are small (1 to 8 per replica, e.g. detection or
    segmentation at high resolution) or when training and inference batches
    differ in nature; with large i.i.d. batches batch norm is usually as good
    and cheaper at inference (it folds into the preceding layer).

    A drop-in replacement for `keras.layers.GroupNormalization`: same
    arguments, same weights (`gamma`, `beta`) in the same order.

    Args:
      groups: int, default 32. Number of groups; must divide the number of
        channels. -1 means one group per channel (instance normalization) and
        1 one group of all channels (layer normalization over C·H·W).
        `ValueError` at build time, naming both numbers, if it is 0, below -1,
        larger than the number of channels or does not divide it. The
        argument is never rewritten: `get_config()` returns what was passed.
      axis: int, default -1. The channel axis: -1 for channels-last, 1 for
        channels-first. `ValueError` at build time if out of range, 0 (the
        batch axis), or of unknown size.
      epsilon: float > 0, default 1e-3. Added to the variance. `ValueError` if
        not positive.
      center: bool, default True. Add the learned offset `beta`.
      scale: bool, default True. Multiply by the learned `gamma`.
      beta_initializer: default "zeros".
      gamma_initializer: default "ones".
      beta_regularizer, gamma_regularizer: default None.
      beta_constraint, gamma_constraint: default None.
      activation: None (default), or an activation fused into the kernel,
        forward and backward, as for `BatchNorm` (same names, same errors).
      jit_compile: bool, default True. As for `BatchNorm`: the XLA-compiled
        kernel for training steps at input shapes that recur, plain TensorFlow
        ops elsewhere (inference, one-off shapes, inside an XLA-compiled step).
      **kwargs: base `Layer` arguments (`name`, `dtype`, `trainable`, ...).

    Call arguments:
      inputs: tensor of rank 2 or more (batch, spatial axes if any, channels;
        with rank 2 each group is normalized over its channels alone). Int and
        bool inputs are cast to float (Keras' layer rounds its output back to
        the integer dtype). `TypeError` for a `tf.RaggedTensor` (as Keras'
        layer refuses it), a `tf.SparseTensor`, strings or complex numbers.
      mask: optional boolean tensor with the input's shape without the channel
        axis (e.g. a padding mask of a sequence). Masked positions are left out
        of their sample's statistics but are still normalized. A sample with
        every position masked gives `beta`, not NaN. `ValueError` for a mask of
        the wrong shape. (Keras' layer ignores masks.)

    Mixed precision: as `BatchNorm`, statistics and arithmetic in float32 and
    the output in the compute dtype; inputs are not autocast.

    Reference:
      Wu & He, "Group Normalization", ECCV 2018, arXiv:1803.08494.
    """

    # Keras' GroupNormalization rejects ragged inputs too: a sample's groups
    # would span rows of different lengths.
    accepts_ragged = False

    def __init__(
        self,
        groups=32,
        axis=-1,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        activation=None,
        jit_compile=True,
        **kwargs,
    ):
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
            raise TypeError(f"Argument `groups` must be an int. Received: groups={groups!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"Argument `axis` must be an int. Received: axis={axis!r}")
        self.groups = int(groups)
        self.axis = int(axis)
        self.epsilon = arguments.check_epsilon(epsilon)
        self.activation = arguments.check_activation(activation)
        self.jit_compile = arguments.check_bool(jit_compile, "jit_compile")
        set_affine_arguments(
            self,
            center=center,
            scale=scale,
            beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer,
            gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint,
            gamma_constraint=gamma_constraint,
        )
        self.supports_masking = True
        # When this layer's kernel is worth compiling (see kernels/warmup.py).
        self._shape_use = kernels.ShapeUse(f"layer {self.name!r}")
        self.channel_axis = None
        self.group_count = None

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ValueError(
                "GroupNorm needs inputs of rank 2 or more (batch, ..., channels). "
                f"Received: input shape {input_shape}"
            )
        (self.channel_axis,) = arguments.resolve_axes(self.axis, input_shape)
        channels = input_shape[self.channel_axis]
        self.group_count = resolve_groups(self.groups, channels)
        add_affine_weights(self, (channels,))
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape), axes={self.channel_axis: channels}
        )

    def compute_output_shape(self, input_shape):
        arguments.resolve_axes(self.axis, tuple(input_shape))
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def call(self, inputs, mask=None):
        if mask is not None:
            arguments.check_mask_shape(tuple(mask.shape), tuple(inputs.shape), (self.channel_axis,))
        dtype = statistics_dtype(inputs.dtype, self.variable_dtype)
        y = kernels.group_norm(
            tf.cast(inputs, dtype),
            read_variable(self.gamma, dtype),
            read_variable(self.beta, dtype),
            mask,
            groups=self.group_count,
            epsilon=self.epsilon,
            channel_axis=self.channel_axis,
            activation=self.activation,
            jit_compile=self.jit_compile,
            shape_use=self._shape_use,
        )
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "groups": self.groups,
                "axis": self.axis,
                "epsilon": self.epsilon,
                **affine_config(self),
                "activation": self.activation,
                "jit_compile": self.jit_compile,
            }
        )
        return config


def resolve_groups(groups, channels):
    """The number of groups for `channels` channels (-1: one per channel).

    Raises:
      ValueError: naming both numbers, if `groups` is 0 or below -1, exceeds
        `channels`, or does not divide it.
    """
    if groups == -1:
        return channels
    if groups <= 0:
        raise ValueError(
            f"Argument `groups` must be a positive divisor of the number of channels "
            f"({channels}), or -1 for one group per channel. Received: groups={groups}"
        )
    if groups > channels:
        raise ValueError(
            f"Argument `groups` ({groups}) cannot be larger than the number of "
            f"channels ({channels}). Received: groups={groups}"
        )
    if channels % groups:
        raise ValueError(
            f"The number of channels ({channels}) must be divisible by `groups` "
            f"({groups}). Received: groups={groups}"
        )
    return groups
