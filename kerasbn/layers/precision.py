"""Dtype handling shared by the layers.

Statistics overflow in float16 (a square above 65504 is inf) and lose digits in
bfloat16, so the layers compute in float32 (float64 stays float64) and cast the
output to the layer's compute dtype. Inputs are not autocast by Keras (the layers
pass `autocast=False`): a float32 input above float16's range must reach the
kernels intact rather than as inf.
"""

import tensorflow as tf


def statistics_dtype(input_dtype, layer_dtype):
    """float64 when the input or the layer's weights are float64, else float32.

    A `dtype="float64"` layer computes in float64 even on float32 input, as
    Keras' layers do (they cast the input to float64 first).
    """
    wide = tf.float64 in (tf.as_dtype(input_dtype), tf.as_dtype(layer_dtype))
    return tf.float64 if wide else tf.float32


def read_variable(variable, dtype):
    """The current value of a Keras variable as a tensor of `dtype`, or None."""
    if variable is None:
        return None
    # A read, not the variable: a tf.Variable passed into a kernel becomes a
    # VariableSpec argument, and relaxed VariableSpecs make TF reuse a trace
    # built for another layer's shapes.
    return tf.cast(tf.convert_to_tensor(variable.value), dtype)
