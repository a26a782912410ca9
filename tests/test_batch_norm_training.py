"""The training flag, the moving averages and fit, against Keras' own layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from references import batch_norm_reference


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.99])
def test_moving_statistics_follow_keras_rule_over_steps(rng, momentum):
    ours = kerasbn.BatchNorm(momentum=momentum)
    theirs = keras.layers.BatchNormalization(momentum=momentum)
    moving_mean = np.zeros(4)
    moving_var = np.ones(4)
    for step in range(5):
        x = rng.normal(step, 1.0 + step, (16, 4)).astype("float32")
        ours(x, training=True)
        theirs(x, training=True)
        _, mean, var = batch_norm_reference(x, None, None, 1e-3, -1)
        moving_mean = moving_mean * momentum + mean * (1 - momentum)
        moving_var = moving_var * momentum + var * (1 - momentum)
    np.testing.assert_allclose(ours.moving_mean.numpy(), moving_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), moving_var, rtol=1e-5)
    np.testing.assert_allclose(ours.moving_mean.numpy(), theirs.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        ours.moving_variance.numpy(), theirs.moving_variance.numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("training", [False, None])
def test_inference_uses_moving_statistics_and_updates_nothing(rng, training):
    layer = kerasbn.BatchNorm()
    layer.build((None, 3))
    layer.moving_mean.assign([1.0, 2.0, 3.0])
    layer.moving_variance.assign([4.0, 1.0, 0.25])
    x = rng.normal(size=(8, 3)).astype("float32")
    y = layer(x, training=training).numpy()
    expected = (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(layer.moving_variance.numpy(), [4.0, 1.0, 0.25])


def test_statistics_update_exactly_once_per_training_call(rng):
    layer = kerasbn.BatchNorm(momentum=0.5)
    x = rng.normal(3.0, 1.0, (32, 2)).astype("float32")
    layer(x, training=True)
    once = layer.moving_mean.numpy()
    np.testing.assert_allclose(once, 0.5 * x.mean(axis=0), rtol=1e-5)


def test_frozen_layer_runs_in_inference_mode_even_when_training(rng):
    layer = kerasbn.BatchNorm()
    x = rng.normal(5.0, 2.0, (16, 3)).astype("float32")
    layer.build(x.shape)
    layer.trainable = False
    before = [w.numpy().copy() for w in layer.weights]
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), rtol=1e-5)
    for old, weight in zip(before, layer.weights):
        np.testing.assert_array_equal(old, weight.numpy())
    assert len(layer.trainable_weights) == 0


def test_frozen_layer_in_fit_keeps_moving_statistics(rng):
    x = rng.normal(4.0, 2.0, (64, 3)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    bn = kerasbn.BatchNorm()
    model = keras.Sequential([keras.Input((3,)), bn, keras.layers.Dense(1)])
    bn.trainable = False
    model.compile("sgd", "mse", jit_compile=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(3))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(3))


def test_weights_match_keras_names_order_and_counts():
    ours = kerasbn.BatchNorm()
    theirs = keras.layers.BatchNormalization()
    ours.build((None, 4, 4, 5))
    theirs.build((None, 4, 4, 5))
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights]
    assert [w.name for w in ours.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert len(ours.trainable_weights) == len(theirs.trainable_weights) == 2
    assert len(ours.non_trainable_weights) == len(theirs.non_trainable_weights) == 2
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in theirs.weights]


def _twin_models(build_layer, axis=-1):
    def make(norm):
        inputs = keras.Input((6, 6, 3))
        h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
        h = norm(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, keras.layers.Dense(2)(h))

    ours = make(build_layer())
    theirs = make(keras.layers.BatchNormalization(momentum=0.9))
    ours.set_weights(theirs.get_weights())
    return ours, theirs


@pytest.mark.parametrize("jit_compile", [True, False])
def test_fit_matches_keras_model_step_for_step(rng, jit_compile):
    x = rng.normal(1.0, 2.0, (64, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(64, 2)).astype("float32")
    ours, theirs = _twin_models(lambda: kerasbn.BatchNorm(momentum=0.9))
    for model in (ours, theirs):
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(ours.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), atol=1e-4)


def test_sequential_model_trains_and_predicts(rng):
    x = rng.normal(size=(128, 8)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16), kerasbn.BatchNorm(), keras.layers.ReLU(), keras.layers.Dense(1, activation="sigmoid")]
    )
    model.compile(keras.optimizers.Adam(0.01), "binary_crossentropy", metrics=["accuracy"], jit_compile=True)
    history = model.fit(x, y, batch_size=32, epochs=15, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
    assert model.evaluate(x, y, verbose=0)[1] > 0.9


def test_training_flag_propagates_from_outer_model(rng):
    x = rng.normal(3.0, 1.0, (16, 4)).astype("float32")
    bn = kerasbn.BatchNorm(momentum=0.0)
    model = keras.Sequential([keras.Input((4,)), bn])
    model(x, training=True)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=0), rtol=1e-5)
    model(x + 10.0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(axis=0), rtol=1e-5)


def test_xla_and_plain_kernels_agree(rng):
    x = rng.normal(size=(8, 5, 5, 4)).astype("float32")
    xla = kerasbn.BatchNorm(jit_compile=True)
    plain = kerasbn.BatchNorm(jit_compile=False)
    np.testing.assert_allclose(xla(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(xla.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-6)
    tf.debugging.assert_near(xla(x), plain(x), atol=1e-5)
