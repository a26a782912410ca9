"""Training steps under oneDNN: TensorFlow's FusedBatchNormV3.

With oneDNN on, a `BatchNorm` training call on a float32 NHWC input of a shape
known while tracing runs inline in the caller's graph, as TensorFlow's
`FusedBatchNormV3` op with its gradient `FusedBatchNormGradV3`, from 96 Ki
elements (below, oneDNN's op costs more per call than our ops take). These
tests check that the op is there exactly where it applies, and that outputs,
gradients and moving statistics equal a float64 formula and Keras' layers
(with the activation as a layer of its own) either way. The value tests take
that path whatever TensorFlow's setting (`onednn_reported_on`): with oneDNN
off the op is TensorFlow's own kernel, with it on oneDNN's.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import kernels
from kerasbn.kernels import tf_internals
from graph_inspection import graph_op_types, training_step, training_step_op_types
from references import batch_norm_formula, moving_average_formula

FUSED_OP = "FusedBatchNormV3"
FUSED_GRADIENT_OP = "FusedBatchNormGradV3"
MOMENTUM = 0.8


def randomized(layer, shape, rng):
    layer.build(shape)
    for variable in layer.weights:
        if "variance" in variable.path:
            value = rng.uniform(0.3, 2.5, variable.shape)
        else:
            value = rng.normal(0.0, 1.0, variable.shape)
        variable.assign(value.astype(variable.dtype))
    return layer


def formula_step(x, w, gamma, beta, epsilon, activation):
    """The same step in float64 TensorFlow ops: `(y, dx, dγ, dβ, mean, variance)`."""
    x, w = tf.constant(x, tf.float64), tf.constant(w, tf.float64)
    gamma, beta = tf.constant(gamma, tf.float64), tf.constant(beta, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        z, mean, variance, _ = batch_norm_formula(x, gamma, beta, epsilon, -1)
        y = keras.activations.get(activation)(z)
        loss = tf.reduce_sum(y * w)
    dx, dgamma, dbeta = tape.gradient(loss, [x, gamma, beta])
    return [t.numpy() for t in (y, dx, dgamma, dbeta, mean, variance)]


FUSED_CASES = [
    # options, activation, shape
    ({}, None, (6, 7, 5, 3)),
    ({}, "relu", (6, 7, 5, 3)),
    ({}, "relu6", (4, 3, 3, 8)),
    ({}, "silu", (4, 3, 3, 8)),
    ({}, "gelu", (4, 3, 3, 8)),
    ({}, "leaky_relu", (4, 3, 3, 8)),
    ({}, "elu", (4, 3, 3, 8)),
    ({}, "sigmoid", (4, 3, 3, 8)),
    ({"center": False}, "relu", (6, 7, 5, 3)),
    ({"scale": False}, None, (6, 7, 5, 3)),
    ({"center": False, "scale": False}, None, (6, 7, 5, 3)),
    ({"epsilon": 1.001e-5}, None, (6, 7, 5, 3)),
    ({}, None, (2, 1, 1, 5)),  # two elements per feature: the unbiased variance is twice the biased
    ({}, None, (1, 1, 2, 5)),
]


@pytest.mark.parametrize("options,activation,shape", FUSED_CASES)
def test_training_step_equals_the_float64_formula_and_uses_the_fused_op(
    onednn_reported_on, rng, options, activation, shape
):
    layer = kerasbn.BatchNorm(momentum=MOMENTUM, activation=activation, **options)
    layer = randomized(layer, shape, rng)
    types = training_step_op_types(layer, shape)
    assert {FUSED_OP, FUSED_GRADIENT_OP} <= types, types
    gamma = layer.gamma.numpy() if layer.scale else np.ones(shape[-1])
    beta = layer.beta.numpy() if layer.center else np.zeros(shape[-1])
    moving_mean, moving_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    x = rng.normal(1.5, 2.0, shape).astype("float32")
    w = rng.normal(size=shape).astype("float32")
    y, (dx, *dweights) = training_step(layer)(tf.constant(x), tf.constant(w))
    want_y, want_dx, want_dgamma, want_dbeta, mean, variance = formula_step(
        x, w, gamma, beta, layer.epsilon, activation
    )
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx.numpy(), want_dx, rtol=1e-3, atol=1e-3)
    want_dweights = ([want_dgamma] if layer.scale else []) + ([want_dbeta] if layer.center else [])
    for got, want in zip(dweights, want_dweights, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3)
    # Keras' rule with the biased batch variance (TensorFlow's op returns the
    # unbiased one: with two elements per feature, twice as large).
    count = np.full(shape[-1], np.prod(shape[:-1]), np.float64)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(),
        moving_average_formula(moving_mean, mean, MOMENTUM, count).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(),
        moving_average_formula(moving_variance, variance, MOMENTUM, count).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("activation", [None, "relu6", "hard_silu", "sigmoid"])
def test_three_training_steps_equal_keras_layers(onednn_reported_on, rng, activation):
    shape = (8, 5, 5, 6)
    ours = randomized(kerasbn.BatchNorm(momentum=MOMENTUM, activation=activation), shape, rng)
    theirs = keras.layers.BatchNormalization(momentum=MOMENTUM)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    ours_step, theirs_step = training_step(ours), training_step(theirs, activation)
    for _ in range(3):
        x = tf.constant(rng.normal(-1.0, 3.0, shape).astype("float32"))
        w = tf.constant(rng.normal(size=shape).astype("float32"))
        got, want = ours_step(x, w), theirs_step(x, w)
        for mine, keras_value in zip(tf.nest.flatten(got), tf.nest.flatten(want), strict=True):
            np.testing.assert_allclose(mine.numpy(), keras_value.numpy(), rtol=1e-4, atol=1e-4)
    for mine, keras_value in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(mine, keras_value, rtol=1e-5, atol=1e-6)


def test_variance_stays_accurate_at_a_large_mean(onednn_reported_on, rng):
    # TensorFlow's op takes the variance in two passes, as our kernels: at mean
    # 1e4 and unit spread a one-pass E[x²] - E[x]² would lose every digit.
    shape = (16, 4, 4, 8)
    x = rng.normal(1e4, 1.0, shape).astype("float32")
    layer = kerasbn.BatchNorm(momentum=0.0)
    layer.build(shape)
    assert FUSED_OP in training_step_op_types(layer, shape)
    y, _ = training_step(layer)(tf.constant(x), tf.ones(shape))
    want_y, _, _, _, mean, variance = formula_step(
        x, np.ones(shape), np.ones(8), np.zeros(8), layer.epsilon, None
    )
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-3)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(y.numpy(), want_y, atol=5e-3)


@pytest.mark.parametrize(
    "make,shape,dtype,why",
    [
        (lambda: kerasbn.BatchNorm(), (1, 1, 1, 3), "float32", "one element per feature"),
        (lambda: kerasbn.BatchNorm(epsilon=1e-6), (2, 4, 4, 3), "float32", "epsilon below cuDNN's"),
        (lambda: kerasbn.BatchNorm(axis=1), (2, 3, 4, 4), "float32", "channels first"),
        (lambda: kerasbn.BatchNorm(), (6, 12), "float32", "rank 2"),
        (lambda: kerasbn.BatchNorm(), (2, 4, 4, 3), "float64", "float64 input"),
        (lambda: kerasbn.BatchNorm(dtype="float64"), (2, 4, 4, 3), "float32", "float64 layer"),
        (lambda: kerasbn.BatchNorm(), (None, 4, 4, 3), "float32", "batch unknown while tracing"),
        (lambda: kerasbn.BatchRenorm(), (2, 4, 4, 3), "float32", "batch renormalization"),
        (lambda: kerasbn.BatchNorm(virtual_batch_size=2), (4, 4, 4, 3), "float32", "ghost batches"),
    ],
)
def test_other_training_calls_keep_our_kernels(onednn_reported_on, make, shape, dtype, why):
    layer = make()
    layer.build(shape)
    types = training_step_op_types(layer, shape, dtype)
    assert not types & {FUSED_OP, FUSED_GRADIENT_OP}, why


@pytest.mark.parametrize("shape", [(4, 3, 3, 2), (16, 8, 8, 256), (16, 8, 8, 1024)])
def test_the_fused_op_runs_exactly_when_onednn_is_on(shape):
    """TensorFlow's setting decides: oneDNN's kernel trained whole models
    faster from 96 Ki elements; TensorFlow's own kernel, with oneDNN off, did
    not. A small input keeps our inline ops either way; with oneDNN off one
    of 2^20 elements (the default `min_elements`) runs our XLA programs."""
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    onednn = tf_internals.onednn_enabled()
    if setting == "0":  # "1" asks, but a TensorFlow built without oneDNN stays off
        assert onednn is False
    layer = kerasbn.BatchNorm()
    layer.build(shape)
    types = training_step_op_types(layer, shape)
    worth_the_op = bool(np.prod(shape) >= kernels.get_xla_policy()["fused_min_elements"])
    assert (FUSED_OP in types) is (worth_the_op and bool(onednn)), types
    large = bool(np.prod(shape) >= kernels.get_xla_policy()["min_elements"])
    assert any("PartitionedCall" in t for t in types) is (large and not onednn), types


# oneDNN's op and its gradient cost about 0.2 ms each per call: below 96 Ki
# elements our inline ops train a layer faster (Policy.fused_min_elements).
@pytest.mark.parametrize(
    "shape, fused",
    [
        ((4, 1, 1, 960), False),
        ((8, 8, 8, 128), False),  # 65536
        ((4, 8, 8, 383), False),  # 98048: one channel short
        ((8, 8, 8, 192), True),  # 98304 = 96 Ki
        ((32, 6, 6, 96), True),
    ],
)
def test_oneDNN_takes_the_fused_op_from_96_ki_elements(onednn_reported_on_at_its_threshold, shape, fused):
    layer = kerasbn.BatchNorm(activation="relu")
    layer.build(shape)
    types = training_step_op_types(layer, shape)
    assert (FUSED_OP in types) is fused, types
    assert (FUSED_GRADIENT_OP in types) is fused, types
    # Either way inline in the step: no program call of ours.
    assert not any("PartitionedCall" in t for t in types), types


def test_under_the_threshold_the_xla_policy_decides_as_without_onednn(
    onednn_reported_on_at_its_threshold,
):
    """`min_elements=0` compiles every size: a small input goes to our XLA
    programs, a large one stays TensorFlow's fused op, inline."""
    with kernels.xla_policy(min_elements=0):
        for shape, fused in (((8, 8, 8, 128), False), ((8, 8, 8, 192), True)):
            layer = kerasbn.BatchNorm()
            layer.build(shape)
            types = training_step_op_types(layer, shape)
            assert (FUSED_OP in types) is fused, (shape, types)
            assert any("PartitionedCall" in t for t in types) is (not fused), (shape, types)


def test_under_the_threshold_a_step_equals_keras(onednn_reported_on_at_its_threshold, rng):
    """Our inline ops under oneDNN, three steps, against Keras' layers."""
    shape = (8, 4, 4, 6)
    ours = randomized(kerasbn.BatchNorm(momentum=MOMENTUM, activation="relu6"), shape, rng)
    assert not training_step_op_types(ours, shape) & {FUSED_OP, FUSED_GRADIENT_OP}
    theirs = keras.layers.BatchNormalization(momentum=MOMENTUM)
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    ours_step, theirs_step = training_step(ours), training_step(theirs, "relu6")
    for _ in range(3):
        x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
        w = tf.constant(rng.normal(size=shape).astype("float32"))
        for mine, keras_value in zip(
            tf.nest.flatten(ours_step(x, w)), tf.nest.flatten(theirs_step(x, w)), strict=True
        ):
            np.testing.assert_allclose(mine.numpy(), keras_value.numpy(), rtol=1e-4, atol=1e-4)
    for mine, keras_value in zip(ours.get_weights(), theirs.get_weights(), strict=True):
        np.testing.assert_allclose(mine, keras_value, rtol=1e-5, atol=1e-6)


def test_an_xla_compiled_step_keeps_our_kernels(onednn_reported_on):
    layer = kerasbn.BatchNorm()
    layer.build((4, 3, 3, 2))
    types = training_step_op_types(layer, (4, 3, 3, 2), jit_compile=True)
    assert not types & {FUSED_OP, FUSED_GRADIENT_OP}, types


def test_masked_training_keeps_our_kernels_and_equals_the_formula(onednn_reported_on, rng):
    shape = (4, 3, 5, 2)
    layer = kerasbn.BatchNorm(momentum=0.0)
    layer.build(shape)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.uniform(size=shape[:-1]) > 0.3

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=tf.constant(mask))
        return y, tape.gradient(tf.reduce_sum(y * y), x)

    graph = step.get_concrete_function(tf.TensorSpec(shape)).graph
    assert FUSED_OP not in {op.type for op in graph.get_operations()}
    y, _ = step(tf.constant(x))
    want, _, _, _ = batch_norm_formula(
        tf.constant(x, tf.float64), tf.ones(2, tf.float64), tf.zeros(2, tf.float64), 1e-3, -1, mask
    )
    np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_a_gradient_of_the_gradient_equals_keras(onednn_reported_on, rng):
    """A gradient penalty on a fused-op shape: exact through our differentiable kernels."""
    shape = (4, 3, 3, 2)
    ours = randomized(kerasbn.BatchNorm(), shape, rng)
    theirs = keras.layers.BatchNormalization()
    theirs.build(shape)
    theirs.set_weights(ours.get_weights())
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    w = tf.constant(rng.normal(size=shape).astype("float32"))

    def penalty_step(layer):
        @tf.function
        def step(x):
            with tf.GradientTape() as outer:
                outer.watch(x)
                with tf.GradientTape() as inner:
                    inner.watch(x)
                    loss = tf.reduce_sum(layer(x, training=True) * w)
                penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
            return outer.gradient(penalty, [x, layer.gamma])

        return step

    def penalty_gradient(layer):
        return [g.numpy() for g in penalty_step(layer)(x)]

    def step_graph(layer, x, w):
        return penalty_step(layer).get_concrete_function(x).graph

    for got, want in zip(penalty_gradient(ours), penalty_gradient(theirs), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
    # The first-order gradient under the outer tape is the autodiff of our
    # differentiable kernel (exact to any order), not TensorFlow's fused gradient.
    assert FUSED_GRADIENT_OP not in graph_op_types(step_graph(ours, x, w))
