"""kerasbn.convert(..., fuse_activations=True) and its reverse in kerasbn.to_keras.

The reference is always the Keras model with the separate activation layer.
"""

import keras
import numpy as np
import pytest

import kerasbn


def assert_close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def convert(model, **options):
    return kerasbn.convert(model, fuse_activations=True, jit_compile=False, **options)


def model_with(norm, activation, channels=6):
    inputs = keras.Input((5, 3), name="x")
    h = keras.layers.Dense(channels, name="project")(inputs)
    h = activation(norm(h))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def randomize(model, rng):
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.GroupNormalization)):
            for weight in layer.weights:
                low = 0.5 if "variance" in weight.name else -0.5
                weight.assign(rng.uniform(low, 1.5, weight.shape))


def data(rng):
    return rng.normal(0.5, 2.0, size=(8, 5, 3)).astype("float32")


def assert_same_model_behaviour(fused, model, rng):
    x = data(rng)
    assert_close(fused(x), model(x))
    for _ in range(2):
        assert_close(fused(x, training=True), model(x, training=True))
    for layer in model.layers:
        if not layer.weights:
            continue  # an activation layer, fused away
        for theirs, ours in zip(layer.weights, fused.get_layer(layer.name).weights):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)


FUSABLE = [
    (lambda: keras.layers.Activation("relu"), "relu"),
    (lambda: keras.layers.Activation("relu6"), "relu6"),
    (lambda: keras.layers.Activation("leaky_relu"), "leaky_relu"),
    (lambda: keras.layers.Activation("elu"), "elu"),
    (lambda: keras.layers.Activation("gelu"), "gelu"),
    (lambda: keras.layers.Activation("swish"), "silu"),
    (lambda: keras.layers.Activation("silu"), "silu"),
    (lambda: keras.layers.Activation("hard_swish"), "hard_silu"),
    (lambda: keras.layers.Activation("sigmoid"), "sigmoid"),
    (lambda: keras.layers.Activation("hard_sigmoid"), "hard_sigmoid"),
    (lambda: keras.layers.Activation("tanh"), "tanh"),
    (lambda: keras.layers.Activation("mish"), "mish"),
    (lambda: keras.layers.Activation("softplus"), "softplus"),
    (lambda: keras.layers.Activation(keras.activations.gelu), "gelu"),
    (lambda: keras.layers.ReLU(), "relu"),
    (lambda: keras.layers.ReLU(6.0), "relu6"),
    (lambda: keras.layers.LeakyReLU(0.2), "leaky_relu"),
    (lambda: keras.layers.ELU(1.0), "elu"),
]


class MyReLU(keras.layers.ReLU):
    pass


@keras.saving.register_keras_serializable(package="test_fusion")
def doubled(x):
    return 2.0 * x


NOT_FUSABLE = [
    lambda: keras.layers.ReLU(max_value=3.0),
    lambda: keras.layers.ReLU(negative_slope=0.1),
    lambda: keras.layers.ReLU(threshold=0.5),
    lambda: keras.layers.LeakyReLU(),  # negative_slope 0.3, not the function's 0.2
    lambda: keras.layers.ELU(0.5),
    lambda: keras.layers.Activation("softmax"),
    lambda: keras.layers.Activation("linear"),
    lambda: keras.layers.Activation(doubled),
    lambda: MyReLU(),
    lambda: keras.layers.Activation("relu", dtype="float64"),  # another dtype policy
]


@pytest.mark.parametrize("activation,name", FUSABLE)
def test_fusable_activation_layer_merges_into_the_batch_norm(activation, name, rng):
    act = activation()
    act_name = act.name
    model = model_with(keras.layers.BatchNormalization(name="bn"), lambda h: act(h))
    randomize(model, rng)
    fused = convert(model)
    assert act_name not in [layer.name for layer in fused.layers]
    assert len(fused.layers) == len(model.layers) - 1
    layer = fused.get_layer("bn")
    assert type(layer) is kerasbn.BatchNorm and layer.activation == name
    assert layer.get_config()["activation"] == name
    assert_same_model_behaviour(fused, model, rng)


@pytest.mark.parametrize("activation", NOT_FUSABLE)
def test_other_activations_stay_separate(activation):
    act = activation()
    model = model_with(keras.layers.BatchNormalization(name="bn"), lambda h: act(h))
    fused = convert(model)
    assert fused.get_layer(act.name)
    assert fused.get_layer("bn").activation is None


def test_group_norm_and_batch_renorm_fuse_too(rng):
    inputs = keras.Input((5, 3))
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.Activation("swish")(keras.layers.GroupNormalization(groups=2, name="gn")(h))
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
    model = keras.Model(inputs, h)
    randomize(model, rng)
    fused = convert(model, batch_norm_to=kerasbn.BatchRenorm)
    assert fused.get_layer("gn").activation == "silu"
    assert type(fused.get_layer("bn")) is kerasbn.BatchRenorm
    assert fused.get_layer("bn").activation == "relu"
    assert len(fused.layers) == len(model.layers) - 2
    x = data(rng)
    assert_close(fused(x), model(x))


def test_our_layers_already_in_the_model_fuse(rng):
    inputs = keras.Input((5, 3))
    h = keras.layers.Dense(6)(inputs)
    h = keras.layers.ReLU(name="relu")(kerasbn.BatchNorm(name="ours", jit_compile=False)(h))
    model = keras.Model(inputs, h)
    fused = convert(model)
    assert fused.get_layer("ours").activation == "relu"
    assert "relu" not in [layer.name for layer in fused.layers]
    x = data(rng)
    assert_close(fused(x, training=True), model(x, training=True))


def test_normalization_with_other_consumers_is_not_fused():
    inputs = keras.Input((5, 3))
    normalized = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(6)(inputs))
    activated = keras.layers.ReLU(name="relu")(normalized)
    model = keras.Model(inputs, keras.layers.Add()([normalized, activated]))
    fused = convert(model)
    assert fused.get_layer("relu") and fused.get_layer("bn").activation is None


def test_normalization_that_is_also_a_model_output_is_not_fused():
    inputs = keras.Input((5, 3))
    normalized = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(6)(inputs))
    model = keras.Model(inputs, [normalized, keras.layers.ReLU(name="relu")(normalized)])
    fused = convert(model)
    assert fused.get_layer("relu") and fused.get_layer("bn").activation is None


def test_shared_activation_layer_is_not_fused():
    inputs = keras.Input((5, 3))
    relu = keras.layers.ReLU(name="relu")
    a = relu(keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(6)(inputs)))
    b = relu(keras.layers.Dense(6)(inputs))
    model = keras.Model(inputs, keras.layers.Add()([a, b]))
    fused = convert(model)
    assert fused.get_layer("relu") and fused.get_layer("bn").activation is None


def test_sequential_and_nested_models_fuse(rng):
    inner = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Dense(6), keras.layers.BatchNormalization(name="inner_bn"),
         keras.layers.ReLU(6.0, name="inner_relu6")],
        name="inner",
    )
    inputs = keras.Input((5, 3))
    h = keras.layers.BatchNormalization(name="outer_bn")(inner(inputs))
    model = keras.Model(inputs, keras.layers.Activation("gelu", name="outer_gelu")(h))
    randomize(inner, rng)
    randomize(model, rng)
    fused = convert(model)
    new_inner = fused.get_layer("inner")
    assert isinstance(new_inner, keras.Sequential)
    assert [type(layer) for layer in new_inner.layers] == [keras.layers.Dense, kerasbn.BatchNorm]
    assert new_inner.get_layer("inner_bn").activation == "relu6"
    assert fused.get_layer("outer_bn").activation == "gelu"
    x = data(rng)
    assert_close(fused(x), model(x))


def test_fused_model_survives_a_keras_file(rng, tmp_path):
    model = model_with(keras.layers.BatchNormalization(name="bn"), keras.layers.Activation("swish"))
    randomize(model, rng)
    fused = convert(model)
    fused.save(tmp_path / "fused.keras")
    loaded = keras.models.load_model(tmp_path / "fused.keras")
    assert loaded.get_layer("bn").activation == "silu"
    x = data(rng)
    np.testing.assert_allclose(loaded(x), fused(x), rtol=1e-6)


def test_to_keras_puts_the_activation_back_as_a_layer(rng):
    inputs = keras.Input((5, 3))
    h = keras.layers.Dense(6, name="bn_relu6")(inputs)  # takes the name the new layer would get
    h = kerasbn.BatchNorm(activation="relu6", name="bn", jit_compile=False)(h)
    h = kerasbn.GroupNorm(groups=2, activation=keras.activations.silu, name="gn", jit_compile=False)(h)
    model = keras.Model(inputs, h)
    back = kerasbn.to_keras(model)
    names = [layer.name for layer in back.layers]
    assert names[-4:] == ["bn", "bn_relu6_1", "gn", "gn_silu"]
    relu6, silu = back.get_layer("bn_relu6_1"), back.get_layer("gn_silu")
    assert type(relu6) is keras.layers.Activation and relu6.activation is keras.activations.relu6
    assert silu.activation is keras.activations.silu
    assert back.get_layer("bn").get_config().get("activation") is None
    x = data(rng)
    assert_close(back(x), model(x))
    assert_close(back(x, training=True), model(x, training=True))


def test_to_keras_of_a_fused_sequential_model(rng):
    model = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Dense(6), kerasbn.BatchNorm(activation="tanh", name="bn")]
    )
    back = kerasbn.to_keras(model)
    kinds = [type(layer).__name__ for layer in back.layers]
    assert kinds == ["Dense", "BatchNormalization", "Activation"]
    x = data(rng)
    assert_close(back(x), model(x))


def test_fusion_keeps_a_mixed_precision_policy(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = model_with(keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU())
    keras.config.set_dtype_policy("float32")
    fused = convert(model)
    layer = fused.get_layer("bn")
    assert layer.activation == "relu" and layer.dtype_policy.name == "mixed_float16"
    x = data(rng)
    np.testing.assert_allclose(np.float32(fused(x)), np.float32(model(x)), rtol=1e-2, atol=1e-2)


@pytest.mark.filterwarnings("ignore:The object being serialized includes a `lambda`")
def test_a_layer_that_cannot_be_rebuilt_from_its_config_is_an_error_naming_it():
    odd = keras.layers.Activation(lambda x: 2.0 * x, name="odd")
    model = model_with(keras.layers.BatchNormalization(), odd)
    with pytest.raises(ValueError, match="'odd' .*cannot be rebuilt from its config"):
        convert(model)
