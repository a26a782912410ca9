"""Training calls on small inputs run plain ops inline; plain graphs sum plainly.

Below the XLA policy's `min_elements` a training call whose input shape is
known while tracing adds the kernel's plain ops to the caller's graph (no
program of its own); graphs not built for XLA sum with one `tf.reduce_sum`
instead of the blocked sums and matrix products laid out for XLA's CPU backend.
Checked against Keras' own layers and float64 NumPy, against the same call
through the XLA programs (`min_elements=0`), and on the graph's ops.
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import kernels
from graph_inspection import training_step, training_step_op_types
from references import batch_norm_reference

OURS = {
    "BatchNorm": (lambda: kerasbn.BatchNorm(momentum=0.9), "normalize_batch"),
    "BatchRenorm": (lambda: kerasbn.BatchRenorm(momentum=0.9), "normalize_batch"),
    "GroupNorm": (lambda: kerasbn.GroupNorm(groups=2), "group_norm"),
    "GhostBatchNorm": (lambda: kerasbn.BatchNorm(momentum=0.9, virtual_batch_size=4), None),
}
KERAS = {
    "BatchNorm": lambda: keras.layers.BatchNormalization(momentum=0.9),
    "GroupNorm": lambda: keras.layers.GroupNormalization(groups=2),
}
SHAPES = [(8, 6), (8, 5, 4), (8, 3, 3, 4)]


def run_step(make, x, w, **policy):
    layer = make()
    layer.build(x.shape)
    with kernels.xla_policy(warmup_calls=0, **policy):
        y, grads = training_step(layer)(x, w)
    return layer, y.numpy(), [g.numpy() for g in grads]


def program_traces(name):
    kernel_name = OURS[name][1]
    return None if kernel_name is None else getattr(kernels, kernel_name).experimental_get_tracing_count()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(OURS))
def test_small_training_call_is_inline_and_equals_the_xla_programs(
    onednn_reported_off, rng, name, shape
):
    x = tf.constant(rng.normal(3.0, 2.0, shape).astype("float32"))
    w = tf.constant(rng.normal(size=shape).astype("float32"))
    make = OURS[name][0]
    before = program_traces(name)
    inline_layer, y, grads = run_step(make, x, w)
    if before is not None:
        assert program_traces(name) == before  # no program traced: the ops went inline
    xla_layer, y_xla, grads_xla = run_step(make, x, w, min_elements=0)
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
    for mine, want in zip(grads, grads_xla):
        np.testing.assert_allclose(mine, want, rtol=1e-4, atol=1e-5)
    for mine, want in zip(inline_layer.non_trainable_weights, xla_layer.non_trainable_weights):
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(KERAS))
def test_small_training_call_equals_keras(rng, name, shape):
    x = tf.constant(rng.normal(-1.0, 3.0, shape).astype("float32"))
    w = tf.constant(rng.normal(size=shape).astype("float32"))
    ours, y, grads = run_step(OURS[name][0], x, w)
    theirs, y_keras, grads_keras = run_step(KERAS[name], x, w)
    np.testing.assert_allclose(y, y_keras, rtol=1e-4, atol=1e-4)
    for mine, want in zip(grads, grads_keras):
        np.testing.assert_allclose(mine, want, rtol=1e-3, atol=1e-4)
    for mine, want in zip(ours.non_trainable_weights, theirs.non_trainable_weights):
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_plain_sums_stay_exact_at_a_large_mean(rng):
    # Two passes (mean, then squared deviations) in the plain graph too: data
    # at mean 1e4 with unit spread keeps its variance in float32.
    x = rng.normal(1e4, 1.0, (64, 32)).astype("float32")
    layer = kerasbn.BatchNorm(momentum=0.0)
    layer.build(x.shape)
    y, _ = training_step(layer)(tf.constant(x), tf.ones_like(x))
    expected, mean, variance = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(y.numpy(), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-3)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)


# BatchNorm on a rank-2 input: under oneDNN, float32 NHWC inputs of 96 Ki
# elements and more are TensorFlow's fused op (test_fused_training.py).
@pytest.mark.parametrize("name, shape", [("BatchNorm", (8, 36)), ("GroupNorm", (8, 3, 3, 4))])
def test_a_graph_run_without_xla_sums_with_reduce_sum(name, shape):
    layer = OURS[name][0]()
    layer.build(shape)
    types = training_step_op_types(layer, shape)
    assert "Sum" in types
    # The XLA layout of the sums: complex packing and products with ones.
    assert not types & {"Complex", "BatchMatMulV2", "MatMul"}, types
    assert not any("PartitionedCall" in t for t in types), types


def test_a_large_input_keeps_the_xla_dispatch():
    layer = kerasbn.BatchNorm()
    # 2^20 elements: the default min_elements. Rank 2: under oneDNN a float32
    # NHWC input of that size runs inline (test_fused_training.py).
    shape = (1024, 1024)
    layer.build(shape)
    types = training_step_op_types(layer, shape)
    assert any("PartitionedCall" in t for t in types), types


@pytest.mark.parametrize("value", [-1, True, 1.5, "64"])
def test_bad_min_elements_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="min_elements"):
        kernels.set_xla_policy(min_elements=value)
    assert kernels.get_xla_policy()["min_elements"] == kernels.Policy().min_elements


def test_eager_training_call_without_a_tape_equals_the_traced_call(rng):
    x = rng.normal(2.0, 3.0, (32, 5)).astype("float32")
    eager, traced = kerasbn.BatchNorm(momentum=0.5), kerasbn.BatchNorm(momentum=0.5)
    for _ in range(3):
        y_eager = eager(x, training=True)
        y_traced = tf.function(lambda v: traced(v, training=True))(x)
    np.testing.assert_allclose(y_eager.numpy(), y_traced.numpy(), rtol=1e-6, atol=1e-6)
    for mine, want in zip(eager.non_trainable_weights, traced.non_trainable_weights):
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-6)
    expected, _, _ = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(y_eager.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, fused_op", [(name, False) for name in sorted(KERAS)] + [("BatchNorm", True)]
)
def test_inline_call_serves_a_persistent_tape_twice_and_counts_its_graph_ops(
    request, rng, name, fused_op
):
    """The inline backward asks the forward's own tape, not a re-traced kernel.

    `fused_op`: the path of a oneDNN BatchNorm on a large input, TensorFlow's
    fused op (here at this small size, `onednn_reported_on`).

    A persistent outer tape asks for the same gradient twice: both answers
    equal Keras'. The backward does not compute the statistics again: the
    forward's reciprocal square root is its only one (a re-traced kernel
    added its whole forward again: 132 backward ops for a BatchNorm forward
    of 106).
    """
    shape = (8, 3, 3, 4)
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
    w = tf.constant(rng.normal(size=shape).astype("float32"))
    counts = {}

    def twice(layer):
        @tf.function
        def step(x):
            graph = tf.compat.v1.get_default_graph()
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(x)
                start = len(graph.get_operations())
                y = layer(x, training=True)
                counts["forward"] = op_types(graph, start)
                loss = tf.reduce_sum(y * w)
            start = len(graph.get_operations())
            first = tape.gradient(loss, [x] + list(layer.trainable_weights))
            counts["backward"] = op_types(graph, start)
            return first, tape.gradient(loss, [x] + list(layer.trainable_weights))

        layer.build(shape)
        return [[g.numpy() for g in grads] for grads in step(x)]

    def op_types(graph, start):
        return collections.Counter(op.type for op in graph.get_operations()[start:])

    if fused_op:
        request.getfixturevalue("onednn_reported_on")
    first, second = twice(OURS[name][0]())
    if fused_op:
        assert counts["forward"]["FusedBatchNormV3"] == 1, counts
        assert counts["backward"]["FusedBatchNormGradV3"] == 1, counts
        assert counts["backward"]["FusedBatchNormV3"] == 0, counts
    else:  # our ops whatever oneDNN: an input this small never takes the fused op
        assert counts["forward"]["Rsqrt"] == 1, counts
        assert counts["backward"]["Rsqrt"] == 0, counts
    assert sum(counts["backward"].values()) < 2 * sum(counts["forward"].values()), counts
    keras_first, _ = twice(KERAS[name]())
    for mine, again, want in zip(first, second, keras_first):
        np.testing.assert_array_equal(mine, again)
        np.testing.assert_allclose(mine, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("activation, op", [("relu", "ReluGrad"), ("relu6", "Relu6Grad")])
def test_a_plain_graph_takes_tensorflows_activation_gradient_op(activation, op):
    # One pass over memory where compare, cast and multiply are three (the
    # values themselves: test_activations.py, inline training steps).
    for layer in (kerasbn.BatchNorm(activation=activation), kerasbn.GroupNorm(2, activation=activation)):
        layer.build((8, 3, 3, 4))
        assert op in training_step_op_types(layer, (8, 3, 3, 4))
