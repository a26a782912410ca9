"""Masks, degenerate batches, non-finite input and low precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from references import batch_norm_reference


@pytest.mark.parametrize(
    "shape,axis", [((6, 5, 3), -1), ((4, 5, 6, 3), -1), ((3, 4, 5, 3, 2), -1), ((4, 3, 5, 6), 1)]
)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_masked_statistics_match_float64_formula(rng, shape, axis, jit_compile):
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    feature = axis % len(shape)
    mask = rng.random([d for i, d in enumerate(shape) if i != feature]) > 0.4
    layer = kerasbn.BatchNorm(axis=axis, momentum=0.0, jit_compile=jit_compile)
    y = layer(x, training=True, mask=mask).numpy()
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, axis, mask=mask)
    np.testing.assert_allclose(y, expected, atol=3e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_masked_channels_last_matches_keras(rng):
    x = rng.normal(1.0, 2.0, (4, 6, 3)).astype("float32")
    mask = rng.random((4, 6)) > 0.5
    ours = kerasbn.BatchNorm()
    theirs = keras.layers.BatchNormalization()
    np.testing.assert_allclose(
        ours(x, training=True, mask=mask), theirs(x, training=True, mask=mask), atol=1e-4
    )
    np.testing.assert_allclose(ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-5)


def test_nan_at_masked_positions_does_not_leak(rng):
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    mask = np.ones((4, 5), bool)
    mask[:, -1] = False
    poisoned = x.copy()
    poisoned[:, -1] = np.nan
    layer = kerasbn.BatchNorm(momentum=0.0)
    y = layer(poisoned, training=True, mask=mask).numpy()
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1, mask=mask)
    np.testing.assert_allclose(y[:, :-1], expected[:, :-1], atol=2e-5)
    assert np.isnan(y[:, -1]).all()
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_mask_from_embedding_propagates_in_functional_model(rng):
    tokens = np.array([[3, 4, 0, 0], [5, 6, 7, 0]])
    inputs = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 3, mask_zero=True)(inputs)
    bn = kerasbn.BatchNorm(momentum=0.0)
    outputs = bn(h)
    model = keras.Model(inputs, outputs)
    embedded = model.layers[1](tokens).numpy()
    model(tokens, training=True)
    _, mean, _ = batch_norm_reference(embedded, None, None, 1e-3, -1, mask=tokens != 0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fully_masked_batch_gives_beta_and_keeps_statistics(rng, jit_compile):
    layer = kerasbn.BatchNorm(jit_compile=jit_compile, beta_initializer="ones")
    x = rng.normal(size=(3, 4, 2)).astype("float32")
    y = layer(x, training=True, mask=np.zeros((3, 4), bool)).numpy()
    np.testing.assert_array_equal(y, np.ones_like(x))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [1.0, 1.0])
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True, mask=np.zeros((3, 4), bool)))
    np.testing.assert_array_equal(tape.gradient(loss, xt).numpy(), np.zeros_like(x))


@pytest.mark.parametrize("jit_compile", [True, False])
def test_empty_batch_gives_no_nan_and_no_update(jit_compile):
    layer = kerasbn.BatchNorm(jit_compile=jit_compile)
    layer.build((None, 4, 3))
    y = layer(np.zeros((0, 4, 3), "float32"), training=True)
    assert tuple(y.shape) == (0, 4, 3)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(3))
    assert tuple(layer(np.zeros((0, 4, 3), "float32")).shape) == (0, 4, 3)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_batch_of_one_vector_has_zero_variance_like_keras(rng, jit_compile):
    x = rng.normal(size=(1, 4)).astype("float32")
    ours = kerasbn.BatchNorm(jit_compile=jit_compile, beta_initializer="ones")
    theirs = keras.layers.BatchNormalization(beta_initializer="ones")
    y = ours(x, training=True).numpy()
    np.testing.assert_allclose(y, np.ones_like(x), atol=1e-6)
    theirs(x, training=True)
    np.testing.assert_allclose(ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), np.full(4, 0.99), rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_keeps_moving_statistics_of_affected_channels(rng, jit_compile, bad):
    x = rng.normal(size=(8, 3)).astype("float32")
    x[2, 1] = bad
    layer = kerasbn.BatchNorm(momentum=0.0, jit_compile=jit_compile)
    y = layer(x, training=True).numpy()
    assert np.isnan(y[:, 1]).all() or not np.isfinite(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()
    np.testing.assert_allclose(layer.moving_mean.numpy()[[0, 2]], x[:, [0, 2]].mean(axis=0), rtol=1e-5)
    assert layer.moving_mean.numpy()[1] == 0.0
    assert layer.moving_variance.numpy()[1] == 1.0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_statistics(rng, policy):
    keras.config.set_dtype_policy(policy)
    layer = kerasbn.BatchNorm(momentum=0.0)
    x = rng.normal(3.0, 2.0, (16, 4)).astype("float32")
    y = layer(x, training=True)
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    assert y.dtype == compute
    assert all(w.dtype == "float32" for w in layer.weights)
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1)
    np.testing.assert_allclose(y.numpy().astype("float32"), expected, atol=3e-2)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


def test_float32_input_above_float16_range_under_mixed_float16(rng):
    keras.config.set_dtype_policy("mixed_float16")
    x = (1e5 + rng.normal(0.0, 1e3, (32, 3))).astype("float32")
    ours = kerasbn.BatchNorm()
    y = ours(x, training=True).numpy()
    expected, _, _ = batch_norm_reference(x, None, None, 1e-3, -1)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.astype("float32"), expected, atol=1e-2)
    assert np.isfinite(ours.moving_mean.numpy()).all()
    # The anchor overflows here (its autocast turns 1e5 into inf).
    keras_y = keras.layers.BatchNormalization()(x, training=True).numpy()
    assert not np.isfinite(keras_y).all()


def test_float16_input_near_its_limit_normalises_correctly(rng):
    keras.config.set_dtype_policy("mixed_float16")
    # x**2 overflows float16 (max 65504): statistics must be taken in float32.
    x = (6e4 + rng.normal(0.0, 500.0, (64, 2))).astype("float16")
    layer = kerasbn.BatchNorm(momentum=0.0)
    y = layer(x, training=True).numpy()
    expected, _, var = batch_norm_reference(x.astype("float64"), None, None, 1e-3, -1)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.astype("float32"), expected, atol=1e-2)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4)


def test_mixed_precision_model_fits_with_xla(rng):
    keras.config.set_dtype_policy("mixed_float16")
    x = rng.normal(size=(64, 5)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), kerasbn.BatchNorm(), keras.layers.Dense(1, dtype="float32")])
    model.compile("adam", "mse", jit_compile=True)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(model.layers[1].moving_variance.numpy()).all()
