"""kerasbn.to_keras on small models: back to Keras' own layers, same outputs, or a clear error."""

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.conversion import configs

needs_keras_renorm = pytest.mark.skipif(
    not configs.keras_renorm_supported(),
    reason="keras.layers.BatchNormalization has renorm from Keras 3.14",
)


def assert_close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def model_with(*norms, shape=(5, 5, 3), channels=6):
    inputs = keras.Input(shape, name="pixels")
    h = keras.layers.Dense(channels, name="project")(inputs)
    for norm in norms:
        h = norm(h)
    return keras.Model(inputs, h, name="ours")


def randomize(model, rng):
    for weight in model.weights:
        if weight.name in ("step", "kernel", "bias"):
            continue
        low = 0.5 if "variance" in weight.name or "stddev" in weight.name else -0.5
        weight.assign(rng.uniform(low, 1.5, weight.shape))


def data(rng, shape=(5, 5, 3)):
    return rng.normal(1.0, 2.0, size=(8,) + shape).astype("float32")


NO_OP_OPTIONS = {"virtual_batch_size": None, "moving_statistics": "batch"}


def test_our_layers_become_keras_layers_with_every_option(rng):
    bn = kerasbn.BatchNorm(
        momentum=0.8,
        epsilon=1e-4,
        scale=False,
        beta_initializer="ones",
        moving_mean_initializer="random_uniform",
        beta_regularizer="l2",
        beta_constraint="non_neg",
        synchronized=True,
        activity_regularizer="l1",
        name="bn",
        jit_compile=False,
    )
    bn.trainable = False
    gn = kerasbn.GroupNorm(
        groups=2, epsilon=1e-2, center=False, gamma_regularizer="l1", name="gn", jit_compile=False
    )
    model = model_with(bn, gn)
    randomize(model, rng)
    back = kerasbn.to_keras(model)
    keras_bn, keras_gn = back.get_layer("bn"), back.get_layer("gn")
    assert type(keras_bn) is keras.layers.BatchNormalization
    assert type(keras_gn) is keras.layers.GroupNormalization
    for ours, theirs in ((bn, keras_bn), (gn, keras_gn)):
        config = theirs.get_config()
        for key, value in ours.get_config().items():
            if key in NO_OP_OPTIONS:  # options Keras lacks, at their no-op value
                assert value == NO_OP_OPTIONS[key] and key not in config, key
            elif key not in ("jit_compile", "activation"):
                assert config[key] == value, key
        for mine, keras_weight in zip(ours.weights, theirs.weights):
            assert mine.name == keras_weight.name
            np.testing.assert_array_equal(mine.numpy(), keras_weight.numpy())
    assert keras_bn.trainable is False
    x = data(rng)
    assert_close(back(x), model(x))


def test_dtype_policies_are_kept(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = model_with(kerasbn.BatchNorm(name="bn"))
    keras.config.set_dtype_policy("float32")
    model.get_layer("bn").moving_variance.assign(rng.uniform(0.5, 2.0, 6))
    back = kerasbn.to_keras(model)
    assert back.get_layer("bn").dtype_policy.name == "mixed_float16"
    x = data(rng)
    ours, theirs = model(x), back(x)
    assert ours.dtype == theirs.dtype == "float16"
    np.testing.assert_allclose(np.float32(theirs), np.float32(ours), rtol=1e-2, atol=1e-2)


def test_outputs_equal_in_training(rng):
    model = model_with(
        kerasbn.BatchNorm(momentum=0.9, name="bn"), kerasbn.GroupNorm(groups=3, name="gn")
    )
    randomize(model, rng)
    back = kerasbn.to_keras(model)
    x = data(rng)
    for _ in range(2):
        assert_close(back(x, training=True), model(x, training=True))
    for mine, theirs in zip(model.weights, back.weights):
        np.testing.assert_allclose(theirs.numpy(), mine.numpy(), rtol=1e-5, atol=1e-6)


def test_round_trip_from_keras_gives_back_the_same_model(rng):
    inputs = keras.Input((4, 4, 3))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4, center=False, name="bn")(h)
    h = keras.layers.GroupNormalization(groups=2, name="gn")(h)
    model = keras.Model(inputs, h, name="original")
    model.get_layer("bn").moving_variance.assign(rng.uniform(0.5, 2.0, 4))
    back = kerasbn.to_keras(kerasbn.convert(model, jit_compile=False))
    assert back.name == model.name
    for original, new in zip(model.layers, back.layers):
        assert type(new) is type(original) and new.get_config() == original.get_config()
        for a, b in zip(original.weights, new.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_axis_given_as_a_one_element_list_becomes_an_int_and_several_axes_are_an_error():
    back = kerasbn.to_keras(model_with(kerasbn.BatchNorm(axis=[-1], name="bn")))
    assert back.get_layer("bn").axis == -1
    with pytest.raises(ValueError, match=r"'bn' .*axis=\[1, 3\]"):
        kerasbn.to_keras(model_with(kerasbn.BatchNorm(axis=[1, 3], name="bn")))


@needs_keras_renorm
def test_batch_renorm_becomes_keras_renorm_and_trains_alike(rng):
    layer = kerasbn.BatchRenorm(r_max=1.5, d_max=0.5, renorm_momentum=0.9, momentum=0.8, name="brn")
    model = model_with(layer)
    randomize(model, rng)
    back = kerasbn.to_keras(model)
    keras_layer = back.get_layer("brn")
    assert keras_layer.renorm is True
    assert keras_layer.renorm_clipping == {"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}
    assert keras_layer.renorm_momentum == 0.9 and keras_layer.momentum == 0.8
    assert [w.name for w in keras_layer.weights] == [w.name for w in layer.weights][:-1]  # no `step`
    for _ in range(3):
        x = data(rng)
        assert_close(back(x, training=True), model(x, training=True), 1e-4)


@needs_keras_renorm
def test_batch_renorm_without_limits_becomes_keras_renorm_without_clipping(rng):
    model = model_with(kerasbn.BatchRenorm(r_max=float("inf"), d_max=float("inf"), name="brn"))
    keras_layer = kerasbn.to_keras(model).get_layer("brn")
    assert keras_layer.renorm_clipping == {"rmax": float("inf"), "rmin": 0.0, "dmax": float("inf")}


def test_batch_renorm_with_a_schedule_is_an_error_naming_the_layer():
    model = model_with(kerasbn.BatchRenorm(**kerasbn.paper_renorm_clipping(), name="scheduled"))
    with pytest.raises(ValueError, match="'scheduled' .*schedule for `r_max`"):
        kerasbn.to_keras(model)


def test_batch_renorm_before_keras_3_14_is_an_error_naming_the_layer(monkeypatch):
    monkeypatch.setattr(configs, "keras_renorm_supported", lambda: False)
    with pytest.raises(ValueError, match="'brn' .*from Keras 3.14"):
        kerasbn.to_keras(model_with(kerasbn.BatchRenorm(name="brn")))


def masked_model(norm):
    inputs = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    return keras.Model(inputs, norm(h))


def test_masked_group_norm_is_an_error_naming_the_layer():
    with pytest.raises(ValueError, match="'gn' .*receives a mask.*ignores"):
        kerasbn.to_keras(masked_model(kerasbn.GroupNorm(groups=2, name="gn")))


def test_masked_batch_norm_converts_when_its_features_are_last(rng):
    model = masked_model(kerasbn.BatchNorm(name="bn"))
    back = kerasbn.to_keras(model)
    tokens = rng.integers(0, 10, size=(6, 7))
    tokens[:, 4:] = 0
    assert_close(back(tokens, training=True), model(tokens, training=True))


def test_masked_batch_norm_over_another_axis_is_an_error_naming_the_layer():
    features = keras.Input((4, 7))
    mask = keras.Input((7,), dtype="bool")
    model = keras.Model([features, mask], kerasbn.BatchNorm(axis=1, name="bn")(features, mask=mask))
    with pytest.raises(ValueError, match="'bn' .*mask.*axis 1"):
        kerasbn.to_keras(model)


def test_a_model_without_our_layers_is_copied(rng):
    model = model_with(keras.layers.BatchNormalization(name="bn"))
    back = kerasbn.to_keras(model)
    assert back is not model and type(back.get_layer("bn")) is keras.layers.BatchNormalization
    x = data(rng)
    np.testing.assert_allclose(back(x), model(x), rtol=1e-6)


def test_subclassed_model_holding_our_layer_is_an_error_naming_it():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="custom")
            self.norm = kerasbn.BatchNorm(name="hidden")

        def call(self, x):
            return self.norm(x)

    inner = Subclassed()
    inputs = keras.Input((3,))
    model = keras.Model(inputs, inner(inputs))
    with pytest.raises(ValueError, match="'custom' .*subclassed.*'hidden'"):
        kerasbn.to_keras(model)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"virtual_batch_size": 4}, r"'ghost' .*ghost batch normalization \(virtual_batch_size=4\)"),
        (
            {"virtual_batch_size": 4, "moving_statistics": "ghost_mean"},
            r"'ghost' .*ghost batch normalization",
        ),
    ],
)
def test_ghost_batch_norm_has_no_keras_equivalent_and_is_an_error_naming_the_layer(options, message):
    model = model_with(kerasbn.BatchNorm(name="ghost", jit_compile=False, **options))
    with pytest.raises(ValueError, match=message):
        kerasbn.to_keras(model)
