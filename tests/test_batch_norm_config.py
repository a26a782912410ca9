"""Serialization, .keras files and rejection of bad arguments."""

import keras
import numpy as np
import pytest

import kerasbn


def test_config_round_trip_keeps_every_argument():
    layer = kerasbn.BatchNorm(
        axis=[1, 3],
        momentum=0.9,
        epsilon=1e-5,
        center=False,
        gamma_initializer="random_normal",
        gamma_regularizer=keras.regularizers.L2(1e-3),
        gamma_constraint="non_neg",
        jit_compile=False,
        name="bn",
    )
    clone = kerasbn.BatchNorm.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.axis == [1, 3] and clone.momentum == 0.9 and clone.epsilon == 1e-5
    assert clone.center is False and clone.jit_compile is False
    assert isinstance(clone.gamma_regularizer, keras.regularizers.L2)


def test_keras_file_round_trip_without_custom_objects(rng, tmp_path):
    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Conv2D(3, 3)(inputs)
    h = kerasbn.BatchNorm(momentum=0.8)(h)
    model = keras.Model(inputs, keras.layers.Flatten()(h))
    x = rng.normal(size=(8, 5, 5, 2)).astype("float32")
    model.compile("sgd", "mse")
    model.fit(x, rng.normal(size=(8, 27)), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[2], kerasbn.BatchNorm)
    assert loaded.layers[2].momentum == 0.8
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_keras_weights_transfer_to_ours(rng):
    x = rng.normal(size=(16, 4)).astype("float32")
    theirs = keras.layers.BatchNormalization()
    for _ in range(3):
        theirs(x * 3 + 1, training=True)
    ours = kerasbn.BatchNorm()
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": "0.9"}, TypeError, "momentum"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": -1e-3}, ValueError, "epsilon"),
        ({"epsilon": float("inf")}, ValueError, "epsilon"),
        ({"epsilon": float("nan")}, ValueError, "epsilon"),
        ({"axis": 1.5}, TypeError, "axis"),
        ({"axis": []}, ValueError, "axis"),
        ({"axis": [1, "2"]}, TypeError, "axis"),
        ({"center": "yes"}, TypeError, "center"),
        ({"jit_compile": None}, TypeError, "jit_compile"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, error, fragment):
    with pytest.raises(error, match=f"`{fragment}`"):
        kerasbn.BatchNorm(**kwargs)


def test_synchronized_outside_a_strategy_behaves_as_unsynchronized(rng):
    x = rng.normal(2.0, 3.0, (16, 4)).astype("float32")
    synced = kerasbn.BatchNorm(synchronized=True)
    plain = kerasbn.BatchNorm()
    np.testing.assert_array_equal(synced(x, training=True), plain(x, training=True))
    np.testing.assert_array_equal(synced.moving_variance.numpy(), plain.moving_variance.numpy())


@pytest.mark.parametrize(
    "axis,shape,fragment",
    [
        (3, (None, 4, 5), "out of range"),
        (-4, (None, 4, 5), "out of range"),
        ([1, -2], (None, 4, 5), "same axis twice"),
        (0, (None, 4, 5), "batch axis"),
        (-1, (None, 4, None), "must be known"),
    ],
)
def test_bad_axis_for_input_is_a_value_error_naming_axis(axis, shape, fragment):
    layer = kerasbn.BatchNorm(axis=axis)
    with pytest.raises(ValueError, match=fragment) as info:
        layer.build(shape)
    assert "axis=" in str(info.value)


def test_unknown_channel_dimension_in_functional_model_is_refused():
    inputs = keras.Input((None, None))
    with pytest.raises(ValueError, match="channel dimension"):
        kerasbn.BatchNorm()(inputs)


@pytest.mark.parametrize("mask_shape", [(4,), (4, 5, 3), (4, 6)])
def test_mask_of_wrong_shape_is_a_value_error_naming_mask(rng, mask_shape):
    layer = kerasbn.BatchNorm()
    x = rng.normal(size=(4, 5, 3)).astype("float32")
    with pytest.raises(ValueError, match="`mask`"):
        layer(x, training=True, mask=np.ones(mask_shape, bool))


def test_input_of_wrong_channel_count_after_build_is_refused(rng):
    layer = kerasbn.BatchNorm()
    layer(rng.normal(size=(2, 3)).astype("float32"))
    with pytest.raises(ValueError):
        layer(rng.normal(size=(2, 4)).astype("float32"))
