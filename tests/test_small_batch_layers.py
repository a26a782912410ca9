"""What BatchRenorm and GroupNorm share with BatchNorm: masks, mixed precision,
serialization, and training in functional models with fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from platform_support import keras_batch_renorm
from references import batch_norm_reference
from test_group_norm import group_norm_reference

LAYERS = {
    "BatchRenorm": lambda: kerasbn.BatchRenorm(momentum=0.9),
    "GroupNorm": lambda: kerasbn.GroupNorm(groups=2),
}


def keras_equivalent(name):
    if name == "GroupNorm":
        return keras.layers.GroupNormalization(groups=2)
    return keras_batch_renorm(
        momentum=0.9, renorm_clipping={"rmax": 3.0, "rmin": 1 / 3.0, "dmax": 5.0}
    )


def test_batch_renorm_mask_excludes_positions_like_batch_norm(rng):
    # With r = 1 and d = 0 allowed to move freely (far from the limits), the
    # statistics are the masked batch's; check them through a float64 formula.
    x = rng.normal(2.0, 1.5, (6, 5, 3)).astype("float32")
    mask = rng.random((6, 5)) > 0.4
    x[~mask] = np.nan  # masked values must never reach the statistics
    layer = kerasbn.BatchRenorm(r_max=1.0, d_max=0.0, momentum=0.0)
    y = layer(x, training=True, mask=mask).numpy()
    expected, mean, var = batch_norm_reference(x, None, None, 1e-3, -1, mask)
    np.testing.assert_allclose(y[mask], expected[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_stddev.numpy(), np.sqrt(var + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_weights_and_statistics(rng, name, policy):
    keras.config.set_dtype_policy(policy)
    layer = LAYERS[name]()
    reference = LAYERS[name]()
    reference.dtype_policy = keras.dtype_policies.get("float32")
    x = rng.normal(1e5, 1e4, (8, 3, 4)).astype("float32")  # far above float16's range
    y = layer(x, training=True)
    expected = reference(x, training=True).numpy()
    assert y.dtype == keras.config.dtype_policy().compute_dtype
    assert np.all(np.isfinite(y.numpy().astype("float32")))
    assert all(w.dtype in ("float32", "int64") for w in layer.weights)
    tolerance = 2e-2 if policy == "mixed_bfloat16" else 3e-3
    np.testing.assert_allclose(y.numpy().astype("float32"), expected, rtol=tolerance, atol=tolerance)
    for mine, want in zip(layer.weights, reference.weights):
        np.testing.assert_allclose(mine.numpy(), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_keras_file_round_trip(tmp_path, rng, name):
    inputs = keras.Input((4, 4, 6))
    hidden = LAYERS[name]()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    x = rng.normal(size=(8, 4, 4, 6)).astype("float32")
    model(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.layers[1]) is type(model.layers[1])
    assert loaded.layers[1].get_config() == model.layers[1].get_config()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("jit_compile", [True, False])
def test_functional_fit_matches_the_keras_layer(rng, name, jit_compile):
    """The same model with our layer or Keras' trains to the same weights."""
    x = rng.normal(1.0, 2.0, (64, 6, 6, 4)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")

    def build(norm):
        keras.utils.set_random_seed(7)
        inputs = keras.Input((6, 6, 4))
        h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
        h = norm(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(3)(h))
        model.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit_compile)
        return model

    ours = build(LAYERS[name]())
    theirs = build(keras_equivalent(name))
    history = ours.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    theirs.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    mine = ours.get_weights()
    if name == "BatchRenorm":
        assert int(ours.layers[2].step.numpy()) == 8
        mine = [w for w, v in zip(mine, ours.weights) if v.name != "step"]
    for got, want in zip(mine, theirs.get_weights()):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_group_norm_output_does_not_depend_on_training_flag_in_fit(rng):
    inputs = keras.Input((5, 4))
    model = keras.Model(inputs, kerasbn.GroupNorm(groups=2)(inputs))
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    np.testing.assert_array_equal(model(x, training=True).numpy(), model(x, training=False).numpy())


def test_group_norm_reference_sanity():
    x = np.arange(8, dtype=np.float64).reshape(1, 2, 4)
    y = group_norm_reference(x, np.ones(4), np.zeros(4), 1, 0.0, -1)
    np.testing.assert_allclose(y.mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.std(), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float16_inputs_whose_squares_overflow_float16_stay_finite(rng, name):
    # Values near 300 are fine in float16, but their squares (9e4) are not: a
    # float16 variance would be inf and the output NaN.
    keras.config.set_dtype_policy("mixed_float16")
    layer = LAYERS[name]()
    x16 = rng.normal(300.0, 50.0, (4, 6, 4)).astype("float16")
    y = layer(x16, training=True).numpy().astype("float32")
    assert np.all(np.isfinite(y))
    keras.config.set_dtype_policy("float32")
    reference = LAYERS[name]()
    expected = reference(x16.astype("float32"), training=True).numpy()
    np.testing.assert_allclose(y, expected, rtol=5e-3, atol=5e-3)
