"""What this machine and these versions can run, for tests that depend on it.

- TensorFlow's `Conv2D` op (which `Conv1D`, `Conv2D` and `DepthwiseConv2D`
  use) accepts the channels-first layout (NCHW) on a CPU only when oneDNN is
  on: "The Conv2D op currently only supports the NHWC tensor format on the
  CPU" otherwise. oneDNN is on by default only on CPUs with AVX-512 (or set
  `TF_ENABLE_ONEDNN_OPTS=1`). XLA runs channels-first convolutions on any CPU,
  so tests evaluate them inside `tf.function(jit_compile=True)` and run them
  as plain ops only in addition, where the machine can.
- With oneDNN on, TensorFlow 2.21's `Conv2D` op on an empty batch returns the
  input's shape instead of the output's ((0, 7, 6, 3) for 5 filters), so a
  model with a convolution fails on an empty batch whatever its
  normalization (Keras' own layer included).
- `keras.layers.BatchNormalization` has `renorm` only from Keras 3.14.0.
"""

import functools
import inspect

import keras
import pytest
import tensorflow as tf

KERAS_HAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization).parameters

RENORM_SKIP_REASON = (
    f"the reference is keras.layers.BatchNormalization(renorm=True), which Keras "
    f"{keras.__version__} lacks (added in Keras 3.14.0); `make test` runs this check"
)

requires_keras_renorm = pytest.mark.skipif(not KERAS_HAS_RENORM, reason=RENORM_SKIP_REASON)


def keras_batch_renorm(**kwargs):
    """`keras.layers.BatchNormalization(renorm=True, **kwargs)`; skips the test where Keras lacks it."""
    if not KERAS_HAS_RENORM:
        pytest.skip(RENORM_SKIP_REASON)
    return keras.layers.BatchNormalization(renorm=True, **kwargs)


@functools.cache
def runs_channels_first_conv():
    """Whether a channels-first convolution runs here as a plain TensorFlow op."""
    try:
        tf.nn.conv2d(tf.ones([1, 1, 2, 2]), tf.ones([1, 1, 1, 1]), 1, "VALID", data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


@functools.cache
def conv_handles_empty_batch():
    """Whether TensorFlow's Conv2D gives the right shape for an empty batch here."""
    conv = tf.function(lambda x: tf.nn.conv2d(x, tf.ones([1, 1, 2, 3]), 1, "VALID"))
    return tuple(conv(tf.zeros([0, 2, 2, 2])).shape) == (0, 2, 2, 3)
