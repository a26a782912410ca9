"""Inference in graphs TensorFlow runs op by op: TensorFlow's FusedBatchNormV3.

Where no gradient is ever taken (`predict`, an export), a float32 NHWC
inference is one `FusedBatchNormV3` op, which TensorFlow's graph optimizer can
fold into a preceding convolution. These tests check that the op is there
exactly where it applies, and that outputs equal Keras' layers and a float64
formula either way.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from graph_inspection import graph_op_types
from platform_support import conv_handles_empty_batch
from references import inference_reference

FUSED_OP = "FusedBatchNormV3"


def predict_graph_ops(model, shape, dtype="float32", jit_compile=False):
    """Op types of the graph `model(x, training=False)` builds, with its functions."""
    function = tf.function(lambda x: model(x, training=False), jit_compile=jit_compile)
    graph = function.get_concrete_function(tf.TensorSpec((None,) + shape[1:], dtype)).graph
    return graph_op_types(graph)


def conv_model(normalization, activation, shape, conv=True):
    inputs = keras.Input(shape[1:])
    y = inputs
    if conv:
        y = keras.layers.Conv2D(5, 3, padding="same", use_bias=False)(y)
    y = normalization()(y)
    if activation is not None:
        y = keras.layers.Activation(activation)(y)
    return keras.Model(inputs, y)


def randomized(model, rng):
    for variable in model.weights:
        if "variance" in variable.path:
            value = rng.uniform(0.3, 2.5, variable.shape)
        else:
            value = rng.normal(0.0, 1.0, variable.shape)
        variable.assign(value.astype("float32"))
    return model


CASES = [
    # layer, options, activation (fused into ours, separate in Keras')
    (kerasbn.BatchNorm, {}, None),
    (kerasbn.BatchNorm, {}, "relu"),
    (kerasbn.BatchNorm, {}, "relu6"),
    (kerasbn.BatchNorm, {}, "silu"),
    (kerasbn.BatchNorm, {"center": False}, "relu"),
    (kerasbn.BatchNorm, {"scale": False}, None),
    (kerasbn.BatchNorm, {"center": False, "scale": False}, None),
    (kerasbn.BatchNorm, {"epsilon": 1.001e-5}, "relu"),
    (kerasbn.BatchRenorm, {}, "relu"),
]


@pytest.mark.parametrize("layer,options,activation", CASES)
@pytest.mark.parametrize("batch", [0, 1, 6])
def test_predict_equals_keras_and_uses_the_fused_op(rng, layer, options, activation, batch):
    shape = (batch, 7, 6, 3)
    # Where TensorFlow's Conv2D mishandles an empty batch (oneDNN), the
    # normalization is checked on its own there.
    conv = batch > 0 or conv_handles_empty_batch()
    keras_model = randomized(
        conv_model(lambda: keras.layers.BatchNormalization(**options), activation, shape, conv),
        rng,
    )
    ours = kerasbn.convert(keras_model, batch_norm_to=layer, fuse_activations=True)
    assert any(isinstance(l, layer) and l.activation is not None for l in ours.layers) == (
        activation is not None
    )
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    want = keras_model.predict_on_batch(x)
    got = ours.predict_on_batch(x)
    assert got.shape == want.shape == (batch, 7, 6, 5 if conv else 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert FUSED_OP in predict_graph_ops(ours, shape)


def test_float64_formula_with_channels_last_conv_outputs(rng):
    shape = (4, 5, 5, 6)
    layer = kerasbn.BatchNorm(epsilon=1e-3)
    layer.build(shape)
    gamma, beta = rng.normal(1.0, 0.3, 6), rng.normal(0.0, 0.5, 6)
    mean, variance = rng.normal(0.0, 2.0, 6), rng.uniform(0.2, 3.0, 6)
    layer.set_weights([w.astype("float32") for w in (gamma, beta, mean, variance)])
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    got = tf.function(lambda v: layer(v, training=False))(x).numpy()
    want = inference_reference(x.astype("float64"), gamma, beta, mean, variance, 1e-3, -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make,shape,why",
    [
        (lambda: kerasbn.BatchNorm(epsilon=1e-6), (2, 4, 4, 3), "epsilon below cuDNN's minimum"),
        (lambda: kerasbn.BatchNorm(axis=1), (2, 3, 4, 4), "channels first"),
        (lambda: kerasbn.BatchNorm(), (2, 4, 3), "rank 3"),
        (lambda: kerasbn.BatchNorm(axis=[1, 3]), (2, 3, 4, 5), "two feature axes"),
        (lambda: kerasbn.BatchNorm(dtype="float64"), (2, 4, 4, 3), "float64"),
    ],
)
def test_other_inputs_keep_the_multiply_add(rng, make, shape, why):
    dtype = "float64" if "float64" in why else "float32"
    inputs = keras.Input(shape[1:], dtype=dtype)
    model = keras.Model(inputs, make()(inputs))
    randomized(model, rng)
    assert FUSED_OP not in predict_graph_ops(model, shape, dtype), why
    layer = model.layers[-1]
    x = rng.normal(size=shape).astype(inputs.dtype)
    weights = [w.numpy().astype("float64") for w in layer.weights]
    axis = layer.axis
    want = inference_reference(x.astype("float64"), *weights, layer.epsilon, axis)
    np.testing.assert_allclose(model.predict_on_batch(x), want, rtol=1e-5, atol=1e-5)


def test_a_recorded_gradient_does_not_use_the_fused_op(rng):
    """A frozen layer under a tape keeps its own kernels (and their gradients)."""
    shape = (3, 4, 4, 2)
    layer = kerasbn.BatchNorm(trainable=False)
    layer.build(shape)
    x = tf.constant(rng.normal(size=shape).astype("float32"))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, x)

    types = graph_op_types(gradient.get_concrete_function(x).graph)
    assert FUSED_OP not in types and "FusedBatchNormGradV3" not in types
    scale = 1.0 / np.sqrt(1.0 + layer.epsilon)
    y = x.numpy() * scale
    np.testing.assert_allclose(gradient(x).numpy(), 2 * y * scale, rtol=1e-5, atol=1e-6)


def test_an_xla_compiled_caller_keeps_the_multiply_add(rng):
    inputs = keras.Input((4, 4, 3))
    model = randomized(keras.Model(inputs, kerasbn.BatchNorm()(inputs)), rng)
    assert FUSED_OP in predict_graph_ops(model, (2, 4, 4, 3))
    assert FUSED_OP not in predict_graph_ops(model, (2, 4, 4, 3), jit_compile=True)
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    compiled = tf.function(lambda v: model(v, training=False), jit_compile=True)
    np.testing.assert_allclose(compiled(x).numpy(), model.predict_on_batch(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_predict_equals_keras(rng, policy):
    keras.config.set_dtype_policy(policy)
    try:
        keras_model = randomized(
            conv_model(keras.layers.BatchNormalization, "relu", (3, 6, 6, 2)), rng
        )
        ours = kerasbn.convert(keras_model, fuse_activations=True)
    finally:
        keras.config.set_dtype_policy("float32")
    x = rng.normal(size=(3, 6, 6, 2)).astype("float32")
    want = keras_model.predict_on_batch(x).astype("float32")
    got = ours.predict_on_batch(x).astype("float32")
    # Both round to the compute dtype; ours normalizes in float32 first.
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 3e-3
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    assert FUSED_OP in predict_graph_ops(ours, (3, 6, 6, 2))


@pytest.mark.parametrize("training", [False, True])
def test_a_graph_traced_without_a_tape_differentiates_later(rng, training):
    """A concrete function traced with no tape, called under one: gradients of
    the input, γ and β equal those of Keras' layer traced the same way."""
    shape = (4, 3, 3, 5)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
    w = tf.constant(rng.normal(size=shape).astype("float32"))
    gradients = []
    for layer in (kerasbn.BatchNorm(momentum=0.5), keras.layers.BatchNormalization(momentum=0.5)):
        layer.build(shape)
        ranges = [(0.5, 1.5), (-1.0, 1.0), (-0.5, 0.5), (0.5, 2.0)]  # γ, β, mean, variance
        layer.set_weights([np.linspace(*bounds, 5).astype("float32") for bounds in ranges])
        forward = tf.function(lambda v, layer=layer: layer(v, training=training))
        concrete = forward.get_concrete_function(tf.TensorSpec(shape))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(concrete(x) * w)
        gradients.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for mine, want in zip(*gradients):
        assert mine is not None and want is not None
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


class PerChannelAdd(keras.layers.Layer):
    """`x + b` with a per-channel weight `b` of shape `bias_shape`, in either operand order."""

    def __init__(self, bias_shape, bias_first=False, **kwargs):
        super().__init__(**kwargs)
        self.bias_shape, self.bias_first = tuple(bias_shape), bias_first

    def build(self, input_shape):
        self.b = self.add_weight(shape=self.bias_shape, initializer="zeros", name="b")

    def call(self, x):
        b = tf.convert_to_tensor(self.b)
        return tf.add(b, x) if self.bias_first else tf.add(x, b)


def biased_model(normalization, shape, add=None, activation="relu"):
    """Conv2D then a bias (Conv2D's own, a `BiasAdd`, or the layer `add()` makes),
    the normalization, relu."""
    inputs = keras.Input(shape[1:])
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=add is None)(inputs)
    if add is not None:
        y = add()(y)
    y = normalization()(y)
    y = keras.layers.Activation(activation)(y)
    return keras.Model(inputs, y)


def fused_op_input_types(graph):
    """The op types feeding the `x` input of each FusedBatchNormV3 in `graph`."""
    return [op.inputs[0].op.type for op in graph.get_operations() if op.type == FUSED_OP]


def fused_op_inputs(model, shape):
    """`fused_op_input_types` of `model`'s predict graph."""
    function = tf.function(lambda x: model(x, training=False))
    return fused_op_input_types(function.get_concrete_function(tf.TensorSpec(shape)).graph)


BIASES = {
    "Conv2D's bias (BiasAdd)": None,
    "AddV2, bias (1, 1, 1, C) second": lambda: PerChannelAdd((1, 1, 1, 4)),
    "AddV2, bias (C,) first": lambda: PerChannelAdd((4,), bias_first=True),
}


@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
def test_a_per_channel_bias_moves_into_the_offset_so_the_op_reads_the_conv(rng, bias):
    """`(a + b - μ) k + β = (a - μ) k + (β + b k)`: the op's input is the
    convolution itself, which TensorFlow's graph optimizer can fold it into."""
    shape = (3, 6, 5, 2)

    def make(normalization):
        return biased_model(normalization, shape, add=bias)

    keras_model = randomized(make(keras.layers.BatchNormalization), rng)
    ours = make(kerasbn.BatchNorm)
    ours.set_weights(keras_model.get_weights())
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    np.testing.assert_allclose(
        ours.predict_on_batch(x), keras_model.predict_on_batch(x), rtol=1e-5, atol=1e-5
    )
    assert fused_op_inputs(ours, shape) == ["Conv2D"]


class Negate(keras.layers.Layer):
    def call(self, x):
        return -x


def other_sums():
    """Models where the op must stay on the sum: `(make, why)`."""

    def bias_along_width(shape):
        inputs = keras.Input(shape[1:])
        y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
        return inputs, PerChannelAdd((1, 1, shape[2], 4))(y)

    def one_channel_plus_bias(shape):
        inputs = keras.Input(shape[1:])
        y = keras.layers.Conv2D(1, 3, padding="same", use_bias=False)(inputs)
        y = PerChannelAdd((1, 1, 1, 4))(y)  # (N, H, W, 1) + (1, 1, 1, 4): broadcast
        return inputs, y

    def sum_read_before(shape):
        inputs = keras.Input(shape[1:])
        y = keras.layers.Conv2D(4, 3, padding="same")(inputs)
        # Farther from the output than the normalization, so Keras runs it
        # first: the sum has a reader when the normalization is traced.
        return inputs, y, Negate()(Negate()(Negate()(y)))

    return {
        "bias varying along the width": bias_along_width,
        "one channel broadcast by the bias": one_channel_plus_bias,
        "the sum read before the normalization": sum_read_before,
    }


@pytest.mark.parametrize("make", other_sums().values(), ids=other_sums().keys())
def test_other_sums_keep_the_op_on_the_sum(rng, make):
    shape = (2, 4, 5, 3)

    def model(normalization):
        inputs, y, *others = make(shape)
        outputs = keras.layers.Activation("relu")(normalization()(y))
        for other in others:
            outputs = keras.layers.Add()([outputs, other])
        return keras.Model(inputs, outputs)

    keras_model = randomized(model(keras.layers.BatchNormalization), rng)
    ours = model(kerasbn.BatchNorm)
    ours.set_weights(keras_model.get_weights())
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(
        ours.predict_on_batch(x), keras_model.predict_on_batch(x), rtol=1e-5, atol=1e-5
    )
    assert fused_op_inputs(ours, shape)[0] in ("AddV2", "BiasAdd")


def test_a_sum_with_control_inputs_keeps_the_op_on_the_sum():
    layer = kerasbn.BatchNorm()
    layer.build((2, 3, 3, 4))

    @tf.function
    def forward(a, b):
        with tf.control_dependencies([tf.no_op()]):
            x = tf.nn.bias_add(a, b)
        return layer(x, training=False)

    graph = forward.get_concrete_function(
        tf.TensorSpec((2, 3, 3, 4)), tf.TensorSpec((4,))
    ).graph
    assert fused_op_input_types(graph) == ["BiasAdd"]


def test_a_large_bias_over_a_small_spread_keeps_its_digits(rng):
    """`(a - (mean - b)) k + β`: the mean and the bias cancel per channel, once,
    where `(a - mean) k + (β + b k)` would cancel two large products per element."""
    shape, bias = (8, 4, 4, 3), np.array([1e3, -2e3, 5e2])
    a = rng.normal(0.0, 0.1, shape)
    x = a + bias
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    gamma, beta = np.array([1.0, 0.5, 2.0]), np.array([0.1, -0.2, 0.3])
    layer = kerasbn.BatchNorm(epsilon=1e-3)
    layer.build(shape)
    layer.set_weights([w.astype("float32") for w in (gamma, beta, mean, variance)])

    @tf.function
    def forward(a, b):
        return layer(tf.nn.bias_add(a, b), training=False)

    got = forward(tf.constant(a, tf.float32), tf.constant(bias, tf.float32)).numpy()
    want = inference_reference(x, gamma, beta, mean.astype("float32"), variance, 1e-3, -1)
    np.testing.assert_allclose(got, want, atol=5e-5)
    graph = forward.get_concrete_function(tf.TensorSpec(shape), tf.TensorSpec((3,))).graph
    assert fused_op_input_types(graph) == ["Placeholder"]


@pytest.mark.parametrize("bias", BIASES.values(), ids=BIASES.keys())
def test_with_the_bias_moved_a_graph_traced_without_a_tape_differentiates_later(rng, bias):
    """Gradients of the input, the convolution's kernel and bias, γ and β equal
    Keras' through the rewritten op (the bias's goes through the offset); the
    moving statistics get none, as before."""
    shape = (4, 5, 5, 3)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
    keras_model = randomized(biased_model(keras.layers.BatchNormalization, shape, bias), rng)
    ours = biased_model(kerasbn.BatchNorm, shape, bias)
    ours.set_weights(keras_model.get_weights())
    assert fused_op_inputs(ours, shape) == ["Conv2D"]
    w = tf.constant(rng.normal(size=(4, 5, 5, 4)).astype("float32"))
    gradients = []
    for model in (ours, keras_model):
        concrete = tf.function(lambda v, model=model: model(v, training=False))
        concrete = concrete.get_concrete_function(tf.TensorSpec(shape))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(concrete(x) * w)
        gradients.append(tape.gradient(loss, [x] + model.trainable_weights))
        moving = [v for v in model.non_trainable_weights if "moving" in v.path]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(concrete(x) * w)
        assert len(moving) == 2 and tape.gradient(loss, moving) == [None, None]
    assert len(gradients[0]) == 5  # x, kernel, bias, γ, β
    for mine, want in zip(*gradients):
        assert mine is not None and want is not None
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
