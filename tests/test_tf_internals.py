"""The private TensorFlow APIs in `kernels/tf_internals.py`: present, meaning what
we assume, and, when missing, replaced by fallbacks that keep gradients exact.

References for the fallback: Keras' own layers (plain autodiff, exact to any
order).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from graph_inspection import training_step_op_types
from kerasbn.kernels import tf_internals


def test_every_private_api_is_found():
    # Fails loudly on a TensorFlow release that moved one: the package still
    # works (exactly, more slowly), but the fast path is gone until fixed.
    assert tf_internals.MISSING == [], f"private TensorFlow APIs not found: {tf_internals.MISSING}"


def test_gradient_recorded_means_a_tape_watches_the_tensor():
    x, y = tf.constant([1.0, 2.0]), tf.constant([3.0])
    assert not tf_internals.gradient_recorded([x])
    with tf.GradientTape() as tape:
        tape.watch(x)
        assert tf_internals.gradient_recorded([x])
        assert not tf_internals.gradient_recorded([y])
        with tape.stop_recording():
            assert not tf_internals.gradient_recorded([x])


def test_forward_accumulator_watches_means_a_tangent_is_tracked():
    x, y = tf.constant([1.0, 2.0]), tf.constant([3.0])
    assert not tf_internals.forward_accumulator_watches([x])
    with tf.autodiff.ForwardAccumulator(x, tf.ones_like(x)):
        assert tf_internals.forward_accumulator_watches([x])
        assert not tf_internals.forward_accumulator_watches([y])


def test_gradient_possibly_watched_means_a_gradient_is_differentiated_again():
    x = tf.constant([1.0, 2.0])
    with tf.GradientTape() as inner:
        inner.watch(x)
        assert tf_internals.gradient_possibly_watched([x])
    assert not tf_internals.gradient_possibly_watched([x])
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = x * x
        dy = inner.gradient(y, x)
        assert tf_internals.gradient_possibly_watched([dy])
    del outer


def test_in_xla_context_only_inside_a_jit_compiled_function():
    seen = {}

    def probe(key):
        seen[key] = tf_internals.in_xla_context()
        return tf.constant(0.0)

    probe("eager")
    tf.function(lambda: probe("graph"))()
    tf.function(lambda: probe("xla"), jit_compile=True)()
    tf.function(lambda: tf.function(lambda: probe("nested"))(), jit_compile=True)()
    assert seen == {"eager": False, "graph": False, "xla": True, "nested": True}


def test_onednn_enabled_follows_tensorflows_setting():
    # TF_ENABLE_ONEDNN_OPTS, when set, decides; unset, TensorFlow decides by
    # the CPU (on with AVX512-VNNI/BF16, AVX-VNNI or AMX), as its start-up
    # message says.
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    enabled = tf_internals.onednn_enabled()
    assert enabled in (True, False)
    if setting == "0":  # "1" asks, but a TensorFlow built without oneDNN stays off
        assert enabled is False


def test_onednn_unknown_keeps_the_xla_programs_for_large_inputs():
    shape = (16, 8, 8, 1024)  # 2^20 elements: the default min_elements
    layer = kerasbn.BatchNorm()
    layer.build(shape)
    with tf_internals.without_private_apis("onednn_enabled"):
        assert tf_internals.onednn_enabled() is None
        types = training_step_op_types(layer, shape)
        assert kerasbn.kernels.explain(layer, np.zeros(shape, "float32")).routes == ("warmup_dispatch",)
    assert any("PartitionedCall" in t for t in types), types
    assert "FusedBatchNormV3" not in types, types


@pytest.fixture
def without_private_apis():
    """As on a TensorFlow release where none of the private APIs exist."""
    with tf_internals.without_private_apis():
        yield


LAYERS = {
    "BatchNorm": (
        lambda: kerasbn.BatchNorm(dtype="float64"),
        lambda: keras.layers.BatchNormalization(dtype="float64"),
    ),
    "GroupNorm": (
        lambda: kerasbn.GroupNorm(groups=2, dtype="float64"),
        lambda: keras.layers.GroupNormalization(groups=2, dtype="float64"),
    ),
}


def first_and_second_order(layer, x, weight):
    sources = [x] + layer.trainable_weights
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(weight * tf.sin(layer(x, training=True)))
        first = inner.gradient(loss, sources)
        penalty = tf.reduce_sum(first[0] ** 2)
    second = outer.gradient(penalty, sources)
    with tf.autodiff.ForwardAccumulator(x, weight) as accumulator:
        y = layer(x, training=True)
    return [g.numpy() for g in first + second] + [accumulator.jvp(y).numpy()]


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_fallbacks_keep_every_derivative_exact(rng, without_private_apis, kind):
    make_ours, make_theirs = LAYERS[kind]
    shape = (6, 3, 4)
    ours, theirs = make_ours(), make_theirs()
    ours.build(shape)
    theirs.build(shape)
    weights = [rng.normal(1.0, 0.3, 4), rng.normal(0.0, 0.3, 4)]
    ours.set_weights(weights + [w.numpy() for w in ours.weights[2:]])
    theirs.set_weights(weights + [w.numpy() for w in theirs.weights[2:]])
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    for a, e in zip(first_and_second_order(ours, x, weight), first_and_second_order(theirs, x, weight)):
        np.testing.assert_allclose(a, e, rtol=1e-8, atol=1e-9)
