"""kerasbn.convert on small models: every option, every error, against Keras' own layers.

Our layers are created with `jit_compile=False` here unless a test is about
the default: the math is the same, and each XLA program costs seconds to
compile. The applications in test_conversion_applications.py use the default.
"""

import math

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.conversion.configs import keras_renorm_supported

needs_keras_renorm = pytest.mark.skipif(
    not keras_renorm_supported(), reason="keras.layers.BatchNormalization has renorm from Keras 3.14"
)
RENORM_KEYS = {"renorm", "renorm_clipping", "renorm_momentum"}


def assert_close(actual, expected, tol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol)


def convert(model, **options):
    return kerasbn.convert(model, jit_compile=options.pop("jit_compile", False), **options)


def randomize_statistics(model, rng):
    """Moves every Keras normalization layer's weights away from their initial values."""
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.GroupNormalization)):
            for weight in layer.weights:
                low = 0.5 if "variance" in weight.name or "stddev" in weight.name else -0.5
                weight.assign(rng.uniform(low, 1.5, weight.shape))


def small_model(*norms, channels=6, rank=4):
    """Input -> Dense(channels) -> each of `norms` in turn -> output."""
    shape = (5,) * (rank - 2) + (3,)
    inputs = keras.Input(shape, name="pixels")
    h = keras.layers.Dense(channels, name="project")(inputs)
    for norm in norms:
        h = norm(h)
    return keras.Model(inputs, h, name="small")


def data(rng, batch=8, channels=3, rank=4):
    return rng.normal(1.0, 2.0, size=(batch,) + (5,) * (rank - 2) + (channels,)).astype("float32")


def assert_config_carried(original, new, dropped=()):
    """Every key of `original`'s config has the same value in `new`'s, except `dropped`."""
    theirs, ours = original.get_config(), new.get_config()
    for key, value in theirs.items():
        if key not in dropped:
            assert key in ours and ours[key] == value, key


# -- BatchNormalization and GroupNormalization to BatchNorm and GroupNorm ----------------


def test_every_option_of_keras_layers_is_carried_over():
    keras_bn = keras.layers.BatchNormalization(
        axis=1,
        momentum=0.8,
        epsilon=1e-4,
        center=False,
        beta_initializer="ones",
        gamma_initializer="random_normal",
        moving_mean_initializer="random_uniform",
        moving_variance_initializer=keras.initializers.Constant(2.0),
        gamma_regularizer=keras.regularizers.L2(0.01),
        beta_regularizer="l1",
        gamma_constraint="non_neg",
        beta_constraint=keras.constraints.MaxNorm(2.0),
        synchronized=True,
        trainable=False,
        dtype="float64",
        activity_regularizer="l2",
        name="bn",
    )
    keras_gn = keras.layers.GroupNormalization(
        groups=3,
        axis=-1,
        epsilon=1e-2,
        scale=False,
        beta_initializer="ones",
        beta_regularizer="l2",
        beta_constraint="non_neg",
        activity_regularizer="l1",
        name="gn",
    )
    model = small_model(keras_bn, keras_gn)
    converted = convert(model)
    bn, gn = converted.get_layer("bn"), converted.get_layer("gn")
    assert type(bn) is kerasbn.BatchNorm and type(gn) is kerasbn.GroupNorm
    assert_config_carried(keras_bn, bn, dropped=RENORM_KEYS)
    assert_config_carried(keras_gn, gn)
    assert bn.get_config()["jit_compile"] is False


def test_outputs_and_statistics_equal_keras_in_training_and_inference(rng):
    model = small_model(
        keras.layers.BatchNormalization(momentum=0.9, name="bn"),
        keras.layers.GroupNormalization(groups=2, name="gn"),
    )
    randomize_statistics(model, rng)
    converted = convert(model)
    x = data(rng)
    assert_close(converted(x), model(x))
    for _ in range(3):
        assert_close(converted(x, training=True), model(x, training=True))
    for theirs, ours in zip(model.weights, converted.weights):
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6)


def test_default_jit_compile_gives_xla_layers_with_the_same_outputs(rng):
    model = small_model(keras.layers.BatchNormalization(name="bn"), rank=3)
    randomize_statistics(model, rng)
    converted = kerasbn.convert(model)
    assert converted.get_layer("bn").jit_compile is True
    x = data(rng, rank=3)
    assert_close(converted(x, training=True), model(x, training=True))


def test_masked_training_equals_keras(rng):
    inputs = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, h)
    converted = convert(model)
    tokens = rng.integers(0, 10, size=(6, 7))
    tokens[:, 4:] = 0
    assert_close(converted(tokens, training=True), model(tokens, training=True))
    np.testing.assert_allclose(
        converted.get_layer("bn").moving_variance.numpy(),
        model.get_layer("bn").moving_variance.numpy(),
        rtol=1e-5,
    )


def test_original_model_is_left_alone(rng):
    model = small_model(keras.layers.BatchNormalization(name="bn"))
    layers = list(model.layers)
    before = [w.numpy().copy() for w in model.weights]
    converted = convert(model)
    converted(data(rng), training=True)
    converted.get_layer("project").kernel.assign(np.zeros((3, 6)))
    assert model.layers == layers and type(model.get_layer("bn")) is keras.layers.BatchNormalization
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)
    assert not {id(w) for w in model.weights} & {id(w) for w in converted.weights}


def test_inputs_outputs_and_names_are_kept(rng):
    image = keras.Input((4, 4, 2), name="image")
    extra = keras.Input((3,), name="extra")
    h = keras.layers.BatchNormalization(name="bn")(keras.layers.Flatten()(image))
    joined = keras.layers.Concatenate()([h, extra])
    model = keras.Model([image, extra], {"score": keras.layers.Dense(1, name="score")(joined), "h": h})
    converted = convert(model)
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]
    assert [t.name for t in converted.inputs] == [t.name for t in model.inputs]
    x = [rng.normal(size=(2, 4, 4, 2)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")]
    ours, theirs = converted(x), model(x)
    assert set(ours) == {"score", "h"}
    assert_close(ours["score"], theirs["score"])


# -- nested, Sequential and shared layers ------------------------------------------------------


def test_nested_models_are_converted_at_every_level(rng):
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4), keras.layers.BatchNormalization(name="inner_bn")],
        name="inner",
    )
    middle_in = keras.Input((4,))
    middle = keras.Model(
        middle_in, keras.layers.GroupNormalization(2, name="middle_gn")(inner(middle_in)), name="middle"
    )
    inputs = keras.Input((4,))
    shared = keras.layers.BatchNormalization(name="shared_bn")
    h = middle(shared(inputs))
    h = shared(keras.layers.Dense(4)(h))
    model = keras.Model(inputs, h)
    randomize_statistics(model, rng)
    randomize_statistics(inner, rng)
    converted = convert(model)
    new_middle = converted.get_layer("middle")
    assert type(new_middle.get_layer("inner").get_layer("inner_bn")) is kerasbn.BatchNorm
    assert type(new_middle.get_layer("middle_gn")) is kerasbn.GroupNorm
    # A layer called twice stays one layer, called twice.
    assert type(converted.get_layer("shared_bn")) is kerasbn.BatchNorm
    assert len(converted.get_layer("shared_bn")._inbound_nodes) == 2
    x = rng.normal(size=(8, 4)).astype("float32")
    assert_close(converted(x), model(x))
    assert_close(converted(x, training=True), model(x, training=True), 1e-4)


def test_sequential_models_are_converted(rng):
    built_with_input = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()], name="seq"
    )
    built_by_call = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()])
    built_by_call(np.zeros((2, 3), "float32"))
    x = rng.normal(size=(8, 3)).astype("float32")
    for model in (built_with_input, built_by_call):
        randomize_statistics(model, rng)
        converted = convert(model)
        assert isinstance(converted, keras.Sequential) and converted.name == model.name
        assert type(converted.layers[-1]) is kerasbn.BatchNorm
        assert_close(converted(x), model(x))


def test_unbuilt_sequential_model_is_an_error():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.BatchNormalization()], name="lazy")
    with pytest.raises(ValueError, match="'lazy' is not built"):
        convert(model)


# -- trainable flags, freezing, dtype policies -------------------------------------------------


def test_trainable_flags_are_kept():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")], name="inner")
    inner.trainable = False
    inputs = keras.Input((4,))
    frozen_bn = keras.layers.BatchNormalization(name="frozen_bn")
    frozen_bn.trainable = False
    h = frozen_bn(inner(inputs))
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, h)
    converted = convert(model)
    assert converted.get_layer("frozen_bn").trainable is False
    assert converted.get_layer("bn").trainable is True
    assert converted.get_layer("inner").trainable is False
    assert converted.get_layer("inner").get_layer("inner_dense").trainable is False
    assert len(converted.trainable_weights) == len(model.trainable_weights) == 2


def test_freeze_makes_every_normalization_layer_run_in_inference(rng):
    model = small_model(
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.GroupNormalization(groups=2, name="gn"),
        kerasbn.BatchNorm(name="ours", jit_compile=False),
    )
    randomize_statistics(model, rng)
    converted = convert(model, freeze=True)
    for name in ("bn", "gn", "ours"):
        assert converted.get_layer(name).trainable is False
    assert converted.get_layer("project").trainable is True
    # Keras' reference: a frozen BatchNormalization normalizes with its moving statistics.
    for layer in model.layers[2:]:
        layer.trainable = False
    x = data(rng)
    assert_close(converted(x, training=True), model(x, training=True))
    np.testing.assert_array_equal(
        converted.get_layer("bn").moving_mean.numpy(), model.get_layer("bn").moving_mean.numpy()
    )


def test_mixed_precision_policies_are_kept(rng):
    keras.config.set_dtype_policy("mixed_float16")
    model = small_model(
        keras.layers.BatchNormalization(name="bn"), keras.layers.GroupNormalization(2, name="gn")
    )
    keras.config.set_dtype_policy("float32")
    randomize_statistics(model, rng)
    converted = convert(model)
    for name in ("bn", "gn"):
        layer = converted.get_layer(name)
        assert layer.dtype_policy.name == "mixed_float16"
        assert layer.gamma.dtype == "float32"
    x = data(rng)
    ours, theirs = converted(x), model(x)
    assert ours.dtype == theirs.dtype == "float16"
    np.testing.assert_allclose(np.float32(ours), np.float32(theirs), rtol=1e-2, atol=1e-2)


# -- to BatchRenorm ---------------------------------------------------------------------------


@needs_keras_renorm
def test_keras_renorm_layer_becomes_batch_renorm(rng):
    keras_layer = keras.layers.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
        renorm_momentum=0.9,
        momentum=0.8,
        name="brn",
    )
    model = small_model(keras_layer)
    randomize_statistics(model, rng)
    converted = convert(model)
    layer = converted.get_layer("brn")
    assert type(layer) is kerasbn.BatchRenorm
    assert (layer.r_max, layer.d_max, layer.renorm_momentum) == (1.5, 0.5, 0.9)
    for _ in range(3):
        x = data(rng)
        assert_close(converted(x, training=True), model(x, training=True), 1e-4)
    for theirs in keras_layer.weights:
        ours = getattr(layer, theirs.name)
        np.testing.assert_allclose(
            ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=theirs.name
        )


@needs_keras_renorm
def test_keras_renorm_without_clipping_has_infinite_limits():
    model = small_model(keras.layers.BatchNormalization(renorm=True, name="brn"))
    layer = convert(model).get_layer("brn")
    assert layer.r_max == math.inf and layer.d_max == math.inf


@needs_keras_renorm
@pytest.mark.parametrize("clipping", [{"rmax": 3.0}, {"rmax": 3.0, "rmin": 0.5}, {"rmin": 0.5}])
def test_keras_renorm_with_asymmetric_clipping_is_an_error_naming_the_layer(clipping):
    layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping, name="odd")
    model = small_model(layer)
    with pytest.raises(ValueError, match=r"'odd'.*rmin = 1/rmax"):
        convert(model)


@needs_keras_renorm
def test_keras_renorm_layer_to_batch_norm_keeps_inference(rng):
    model = small_model(keras.layers.BatchNormalization(renorm=True, name="brn"))
    randomize_statistics(model, rng)
    converted = convert(model, batch_norm_to=kerasbn.BatchNorm)
    assert type(converted.get_layer("brn")) is kerasbn.BatchNorm
    x = data(rng)
    assert_close(converted(x), model(x))


def test_batch_norm_to_batch_renorm_starts_from_the_moving_statistics(rng):
    model = small_model(keras.layers.BatchNormalization(epsilon=0.01, name="bn"))
    randomize_statistics(model, rng)
    converted = convert(
        model, batch_norm_to=kerasbn.BatchRenorm, r_max=1.5, d_max=0.5, renorm_momentum=0.9
    )
    layer, keras_layer = converted.get_layer("bn"), model.get_layer("bn")
    assert type(layer) is kerasbn.BatchRenorm
    assert (layer.r_max, layer.d_max, layer.renorm_momentum) == (1.5, 0.5, 0.9)
    mean = keras_layer.moving_mean.numpy()
    stddev = np.sqrt(keras_layer.moving_variance.numpy().astype("float64") + 0.01)
    np.testing.assert_array_equal(layer.renorm_mean.numpy(), mean)
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), stddev, rtol=1e-7)
    np.testing.assert_allclose(layer.moving_stddev.numpy(), stddev, rtol=1e-7)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), keras_layer.moving_variance.numpy())
    assert int(layer.step.numpy()) == 0
    x = data(rng)
    assert_close(converted(x), model(x))


@needs_keras_renorm
def test_batch_norm_to_batch_renorm_trains_as_keras_renorm_from_the_same_statistics(rng):
    model = small_model(keras.layers.BatchNormalization(momentum=0.8, name="bn"))
    randomize_statistics(model, rng)
    converted = convert(
        model, batch_norm_to=kerasbn.BatchRenorm, r_max=1.5, d_max=0.5, renorm_momentum=0.9
    )
    source = model.get_layer("bn")
    reference = keras.layers.BatchNormalization(
        momentum=0.8, renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
        renorm_momentum=0.9,
    )
    reference.build((None, 5, 5, 6))
    gamma, beta, mean, variance = source.get_weights()
    stddev = np.sqrt(variance + source.epsilon)
    reference.set_weights([gamma, beta, mean, variance, stddev, mean, stddev])
    project = model.get_layer("project")
    for _ in range(3):
        x = data(rng)
        assert_close(converted(x, training=True), reference(project(x), training=True), 1e-4)


def test_batch_norm_to_batch_renorm_takes_a_schedule():
    model = small_model(keras.layers.BatchNormalization(name="bn"))
    converted = convert(model, batch_norm_to=kerasbn.BatchRenorm, **kerasbn.paper_renorm_clipping())
    layer = converted.get_layer("bn")
    assert isinstance(layer.r_max, kerasbn.LinearRamp) and layer.r_max.final_value == 3.0


# -- to GroupNorm ---------------------------------------------------------------------------------


def test_batch_norm_to_group_norm_keeps_gamma_and_beta(rng):
    model = small_model(keras.layers.BatchNormalization(epsilon=0.01, name="bn"))
    randomize_statistics(model, rng)
    converted = convert(model, batch_norm_to=kerasbn.GroupNorm, groups=3)
    layer = converted.get_layer("bn")
    assert type(layer) is kerasbn.GroupNorm and layer.groups == 3 and layer.epsilon == 0.01
    source = model.get_layer("bn")
    reference = keras.layers.GroupNormalization(groups=3, epsilon=0.01)
    reference.build((None, 5, 5, 6))
    reference.set_weights([source.gamma.numpy(), source.beta.numpy()])
    x = data(rng)
    assert_close(converted(x), reference(model.get_layer("project")(x)))


def test_groups_may_be_a_function_of_the_channel_count():
    model = small_model(
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(24),
        keras.layers.BatchNormalization(name="bn24"),
    )
    converted = convert(
        model, batch_norm_to=kerasbn.GroupNorm, groups=lambda channels: math.gcd(channels, 32)
    )
    assert converted.get_layer("bn").groups == 2
    assert converted.get_layer("bn24").groups == 8
    instance_norm = convert(model, batch_norm_to=kerasbn.GroupNorm, groups=-1)
    assert instance_norm.get_layer("bn24").groups == -1 and instance_norm.get_layer("bn24").group_count == 24


def test_groups_not_dividing_the_channels_is_an_error_naming_the_layer_and_the_channels():
    model = small_model(keras.layers.BatchNormalization(name="bn"))
    with pytest.raises(ValueError, match=r"'bn' \(6 channels\)"):
        convert(model, batch_norm_to=kerasbn.GroupNorm, groups=4)
    with pytest.raises(ValueError, match=r"'bn' \(6 channels\)"):
        convert(model, batch_norm_to=kerasbn.GroupNorm)  # the default, 32
    with pytest.raises(TypeError, match="`groups` returned 1.5 for layer 'bn'"):
        convert(model, batch_norm_to=kerasbn.GroupNorm, groups=lambda channels: 1.5)


# -- argument errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"batch_norm_to": "BatchNorm"}, ValueError, "`batch_norm_to`"),
        ({"batch_norm_to": keras.layers.BatchNormalization}, ValueError, "`batch_norm_to`"),
        ({"r_max": 2.0}, ValueError, "`r_max` applies only with batch_norm_to=kerasbn.BatchRenorm"),
        ({"batch_norm_to": kerasbn.GroupNorm, "d_max": 1.0}, ValueError, "`d_max` applies only"),
        ({"renorm_momentum": 0.9}, ValueError, "`renorm_momentum` applies only"),
        ({"groups": 2}, ValueError, "`groups` applies only with batch_norm_to=kerasbn.GroupNorm"),
        ({"batch_norm_to": kerasbn.BatchRenorm, "r_max": 0.5}, ValueError, "`r_max`"),
        ({"batch_norm_to": kerasbn.BatchRenorm, "renorm_momentum": 1.0}, ValueError, "`renorm_momentum`"),
        ({"batch_norm_to": kerasbn.GroupNorm, "groups": 2.0}, TypeError, "`groups`"),
        ({"freeze": "yes"}, TypeError, "`freeze`"),
        ({"fuse_activations": 1}, TypeError, "`fuse_activations`"),
        ({"jit_compile": None}, TypeError, "`jit_compile`"),
    ],
)
def test_bad_arguments_are_errors_naming_them(options, error, message):
    model = small_model(keras.layers.BatchNormalization())
    with pytest.raises(error, match=message):
        kerasbn.convert(model, **options)


def test_a_model_that_is_not_keras_3_is_a_type_error():
    import tf_keras

    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(2, input_shape=(3,)), tf_keras.layers.BatchNormalization()]
    )
    with pytest.raises(TypeError, match="Keras 3"):
        kerasbn.convert(model)
    with pytest.raises(TypeError, match="Keras 3"):
        kerasbn.convert(keras.layers.BatchNormalization())


# -- what cannot be converted ----------------------------------------------------------------------


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(name="hidden_bn")

    def call(self, x):
        return self.norm(x)


def test_subclassed_model_is_an_error_naming_it():
    model = Subclassed(name="custom")
    model(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="'custom' .*subclassed model"):
        convert(model)
    inputs = keras.Input((3,))
    outer = keras.Model(inputs, model(inputs))
    with pytest.raises(ValueError, match="'custom' .*subclassed model.*'hidden_bn'"):
        convert(outer)


def test_a_normalization_layer_inside_another_layer_is_an_error_naming_both():
    inputs = keras.Input((4, 3))
    wrapped = keras.layers.TimeDistributed(keras.layers.BatchNormalization(name="inner"), name="td")
    model = keras.Model(inputs, wrapped(inputs))
    with pytest.raises(ValueError, match="'td' .*'inner'"):
        convert(model)


def test_layers_without_normalization_inside_are_copied_with_their_weights(rng):
    inputs = keras.Input((4, 3))
    h = keras.layers.TimeDistributed(keras.layers.Dense(2), name="td")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization()(h))
    converted = convert(model)
    x = rng.normal(size=(2, 4, 3)).astype("float32")
    assert_close(converted(x), model(x))


def test_subclass_of_batch_normalization_overriding_call_is_an_error_naming_it():
    class Doubled(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            return 2 * super().call(inputs, training=training, mask=mask)

    with pytest.raises(ValueError, match="'doubled' \\(Doubled\\) subclasses BatchNormalization"):
        convert(small_model(Doubled(name="doubled")))


class WithOption(keras.layers.BatchNormalization):
    """A tf_keras-style compatibility layer: Keras 3's layer plus a config option."""

    def __init__(self, option_name="virtual_batch_size", option=None, **kwargs):
        super().__init__(**kwargs)
        self.option_name, self.option = option_name, option

    def get_config(self):
        return {**super().get_config(), self.option_name: self.option}


def test_tf_keras_ghost_batch_norm_maps_onto_ours_with_tf_keras_moving_rule(rng):
    """A tf_keras-style `virtual_batch_size` becomes ours, with tf_keras' rule
    for the moving statistics (the mean of the ghost batches'), so the model
    trains on as it did; the training step normalizes each ghost batch."""
    original = small_model(WithOption(option=4, name="ghost", momentum=0.5))
    converted = convert(original)
    layer = converted.get_layer("ghost")
    assert type(layer) is kerasbn.BatchNorm
    assert layer.virtual_batch_size == 4 and layer.moving_statistics == "ghost_mean"
    x = rng.normal(size=(8, *original.inputs[0].shape[1:])).astype("float32")
    features = keras.Model(converted.inputs, layer.input)(x).numpy().astype(np.float64)
    converted(x, training=True)
    axes = tuple(range(features.ndim - 1))
    ghost_means = [features[part].mean(axis=axes) for part in (slice(0, 4), slice(4, 8))]
    ghost_vars = [features[part].var(axis=axes) for part in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * np.mean(ghost_means, 0), atol=1e-5)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), 0.5 + 0.5 * np.mean(ghost_vars, 0), atol=1e-5
    )
    renormalized = convert(original, batch_norm_to=kerasbn.BatchRenorm).get_layer("ghost")
    assert type(renormalized) is kerasbn.BatchRenorm and renormalized.virtual_batch_size == 4


def test_ghost_batch_norm_to_group_norm_is_an_error_naming_the_layer():
    message = r"'ghost' .*ghost batch normalization \(virtual_batch_size=4\)"
    with pytest.raises(ValueError, match=message):
        convert(
            small_model(WithOption(option=4, name="ghost")), batch_norm_to=kerasbn.GroupNorm, groups=1
        )


def test_an_unknown_option_is_an_error_naming_it_never_dropped():
    with pytest.raises(ValueError, match="'extra' .*`adjustment`=.*silently drop"):
        convert(small_model(WithOption("adjustment", option=lambda: 1, name="extra")))
    with pytest.raises(ValueError, match="'extra' .*`new_option`=3"):
        convert(small_model(WithOption("new_option", option=3, name="extra")))


def test_tf_keras_options_at_their_no_op_value_convert(rng):
    model = small_model(WithOption(option=None, name="plain"))
    converted = convert(model)
    assert type(converted.get_layer("plain")) is kerasbn.BatchNorm
