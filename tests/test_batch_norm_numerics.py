"""Outputs of kerasbn.BatchNorm against Keras' layer and a float64 formula."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from references import batch_norm_reference, inference_reference

SHAPES_AND_AXES = [
    ((16, 6), -1),
    ((16, 6), 1),
    ((8, 7, 5), -1),
    ((8, 5, 7), 1),
    ((4, 6, 5, 3), -1),
    ((4, 3, 6, 5), 1),
    ((2, 4, 3, 5, 3), -1),
    ((2, 3, 4, 3, 5), 1),
]


def random_weights(rng, channels):
    return [
        rng.normal(1.0, 0.3, channels).astype("float32"),
        rng.normal(0.0, 0.5, channels).astype("float32"),
        rng.normal(0.0, 1.0, channels).astype("float32"),
        rng.uniform(0.5, 2.0, channels).astype("float32"),
    ]


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_matches_keras_and_float64_formula(rng, shape, axis, jit_compile):
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    ours = kerasbn.BatchNorm(axis=axis, jit_compile=jit_compile)
    theirs = keras.layers.BatchNormalization(axis=axis)
    ours.build(shape)
    theirs.build(shape)
    weights = random_weights(rng, shape[axis])
    theirs.set_weights(weights)
    ours.set_weights(theirs.get_weights())

    train_ours = ours(x, training=True).numpy()
    train_theirs = theirs(x, training=True).numpy()
    expected, _, _ = batch_norm_reference(x, weights[0], weights[1], 1e-3, axis)
    np.testing.assert_allclose(train_ours, expected, atol=2e-5)
    np.testing.assert_allclose(train_ours, train_theirs, atol=2e-5)

    infer_ours = ours(x, training=False).numpy()
    infer_theirs = theirs(x, training=False).numpy()
    expected = inference_reference(
        x, weights[0], weights[1], ours.moving_mean.numpy(), ours.moving_variance.numpy(), 1e-3, axis
    )
    np.testing.assert_allclose(infer_ours, expected, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(infer_ours, infer_theirs, rtol=1e-5, atol=2e-5)


def test_channels_first_equals_channels_last_after_transpose(rng):
    x = rng.normal(size=(4, 6, 5, 3)).astype("float32")
    last = kerasbn.BatchNorm(axis=-1)
    first = kerasbn.BatchNorm(axis=1)
    y_last = last(x, training=True).numpy()
    y_first = first(np.transpose(x, (0, 3, 1, 2)), training=True).numpy()
    np.testing.assert_allclose(np.transpose(y_first, (0, 2, 3, 1)), y_last, atol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), last.moving_variance.numpy(), rtol=1e-6)


def test_several_feature_axes_match_float64_formula(rng):
    x = rng.normal(1.0, 2.0, (6, 4, 5, 3)).astype("float32")
    layer = kerasbn.BatchNorm(axis=[1, 3])
    y = layer(x, training=True).numpy()
    assert layer.gamma.shape == (4, 3)
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, [1, 3])
    np.testing.assert_allclose(y, expected, atol=2e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.01 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.99 + 0.01 * var, rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_large_mean_small_spread_is_stable_in_float32(rng, jit_compile):
    # One-pass E[x^2] - E[x]^2 in float32 loses all digits here (1e8 - 1e8).
    x = (1e4 + rng.normal(0.0, 1.0, (256, 8))).astype("float32")
    layer = kerasbn.BatchNorm(momentum=0.0, jit_compile=jit_compile)
    y = layer(x, training=True).numpy()
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(y, expected, atol=2e-3)
    np.testing.assert_allclose(y.std(axis=0), 1.0, atol=2e-3)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=2e-3)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)


def test_center_and_scale_false_create_no_parameters(rng):
    x = rng.normal(size=(8, 4)).astype("float32")
    layer = kerasbn.BatchNorm(center=False, scale=False)
    y = layer(x, training=True).numpy()
    assert [w.name for w in layer.weights] == ["moving_mean", "moving_variance"]
    expected, _, _ = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(y, expected, atol=2e-5)


def test_float64_layer_computes_in_float64(rng):
    x = (1e6 + rng.normal(0.0, 1e-2, (64, 3))).astype("float64")
    layer = kerasbn.BatchNorm(dtype="float64")
    y = layer(x, training=True)
    assert y.dtype == tf.float64
    expected, _, _ = batch_norm_reference(x, None, None, 1e-3, -1)
    # float32 arithmetic would be off by O(1) here (ulp of 1e6 is 0.06).
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-7, atol=1e-7)


FLOAT64_LAYERS = {
    "BatchNorm": lambda: kerasbn.BatchNorm(dtype="float64"),
    "BatchRenorm": lambda: kerasbn.BatchRenorm(r_max=1.0, d_max=0.0, dtype="float64"),
    "GroupNorm": lambda: kerasbn.GroupNorm(groups=1, dtype="float64"),
}


@pytest.mark.parametrize("name", sorted(FLOAT64_LAYERS))
def test_float64_layer_computes_in_float64_on_float32_input(rng, name):
    # Keras casts the input to a float64 layer's dtype first; so must we. The
    # float32 input's values are exact in float64, and the spread (1e-4 of the
    # mean) leaves float32 arithmetic with only ~3 correct digits.
    x = (1.0 + 1e-4 * rng.normal(size=(64, 3))).astype("float32")
    layer = FLOAT64_LAYERS[name]()
    y = layer(x, training=True)
    assert y.dtype == tf.float64
    if isinstance(layer, kerasbn.GroupNorm):  # one group: statistics per sample
        expected = batch_norm_reference(x.astype("float64").T, None, None, 1e-3, -1)[0].T
    else:
        expected, _, _ = batch_norm_reference(x.astype("float64"), None, None, 1e-3, -1)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_inside_tf_function_with_varying_batch(rng):
    layer = kerasbn.BatchNorm()
    step = tf.function(lambda x: layer(x, training=True), reduce_retracing=True)
    for batch in (4, 7, 9):
        x = rng.normal(size=(batch, 5)).astype("float32")
        expected, _, _ = batch_norm_reference(x, None, None, 1e-3, -1)
        np.testing.assert_allclose(step(tf.constant(x)).numpy(), expected, atol=2e-5)
