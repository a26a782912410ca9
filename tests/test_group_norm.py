"""kerasbn.GroupNorm against Keras' GroupNormalization, float64 NumPy and finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from references import central_differences


def group_norm_reference(x, gamma, beta, groups, epsilon, axis, mask=None):
    """Wu & He's formula in float64; `mask` has x's shape without the channel axis."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    channels = x.shape[-1]
    grouped = x.reshape(x.shape[:-1] + (groups, channels // groups))
    if mask is None:
        weights = np.ones(x.shape[:-1])
    else:
        weights = np.asarray(mask, np.float64)
    weights = np.broadcast_to(weights[..., None, None], grouped.shape)
    spatial = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    count = weights.sum(axis=spatial, keepdims=True)
    safe = np.where(weights > 0, grouped, 0.0)
    mean = safe.sum(axis=spatial, keepdims=True) / np.maximum(count, 1)
    var = (weights * (safe - mean) ** 2).sum(axis=spatial, keepdims=True) / np.maximum(count, 1)
    normalized = np.where(count > 0, (grouped - mean) / np.sqrt(var + epsilon), 0.0)
    y = normalized.reshape(x.shape) * np.asarray(gamma, np.float64) + np.asarray(beta, np.float64)
    return np.moveaxis(y, -1, axis)


CASES = [
    ((4, 7, 8), -1, 4),
    ((3, 8, 7), 1, 2),
    ((2, 5, 6, 12), -1, 3),
    ((2, 12, 5, 6), 1, 4),
    ((2, 3, 4, 5, 8), -1, 8),
    ((2, 8, 3, 4, 5), 1, 1),
    ((3, 6, 6), -1, -1),
]


@pytest.mark.parametrize("shape,axis,groups", CASES)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_outputs_and_gradients_match_keras(rng, shape, axis, groups, jit_compile):
    x = tf.constant(rng.normal(2.0, 3.0, shape).astype("float32"))
    weight = tf.constant(rng.normal(size=shape).astype("float32"))
    ours = kerasbn.GroupNorm(groups=groups, axis=axis, jit_compile=jit_compile)
    theirs = keras.layers.GroupNormalization(groups=groups, axis=axis)
    ours.build(shape)
    theirs.build(shape)
    channels = shape[axis]
    theirs.set_weights([rng.normal(1.0, 0.3, channels), rng.normal(0.0, 0.3, channels)])
    ours.set_weights(theirs.get_weights())

    def run(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y**2 * weight)
        return [y] + tape.gradient(loss, [x, layer.gamma, layer.beta])

    for got, want in zip(run(ours), run(theirs)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=2e-4, atol=2e-4)
    expected = group_norm_reference(
        x.numpy(), *theirs.get_weights(), groups if groups > 0 else channels, 1e-3, axis
    )
    np.testing.assert_allclose(ours(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", [None, "partial"])
def test_gradient_matches_finite_differences(rng, mask_kind):
    shape, groups = (2, 3, 4), 2
    x0 = rng.normal(0.0, 2.0, shape)
    weight = rng.normal(size=shape)
    mask = None if mask_kind is None else rng.random(shape[:-1]) > 0.3
    layer = kerasbn.GroupNorm(groups=groups, dtype="float64")
    layer.build(shape)
    layer.gamma.assign(rng.normal(1.0, 0.5, 4))
    layer.beta.assign(rng.normal(0.0, 0.5, 4))

    def loss(x):
        return tf.reduce_sum(layer(tf.constant(x), mask=mask) ** 2 * weight)

    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = loss(xt)
    analytic = tape.gradient(value, [xt, layer.gamma, layer.beta])
    np.testing.assert_allclose(analytic[0].numpy(), central_differences(loss, x0), rtol=1e-5, atol=1e-6)
    gamma0 = layer.gamma.numpy().copy()

    def loss_of_gamma(gamma):
        layer.gamma.assign(gamma)
        return loss(x0)

    numeric_gamma = central_differences(loss_of_gamma, gamma0)
    layer.gamma.assign(gamma0)
    np.testing.assert_allclose(analytic[1].numpy(), numeric_gamma, rtol=1e-5, atol=1e-6)


def test_batch_of_one_gives_the_same_output_as_inside_a_batch(rng):
    layer = kerasbn.GroupNorm(groups=4)
    x = rng.normal(1.0, 2.0, (6, 5, 5, 8)).astype("float32")
    whole = layer(x).numpy()
    for i in range(6):
        np.testing.assert_allclose(layer(x[i : i + 1]).numpy()[0], whole[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x, training=True).numpy(), whole, rtol=1e-6)


def test_no_moving_statistics_and_keras_weight_names():
    layer = kerasbn.GroupNorm(groups=2)
    layer.build((None, 3, 4))
    assert [w.name for w in layer.weights] == ["gamma", "beta"]
    assert layer.non_trainable_weights == []


def test_instance_and_layer_norm_special_cases(rng):
    x = rng.normal(3.0, 2.0, (2, 4, 6)).astype("float32")
    instance = kerasbn.GroupNorm(groups=-1, epsilon=1e-5)(x).numpy()
    mean, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    np.testing.assert_allclose(instance, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    layer_norm = kerasbn.GroupNorm(groups=1, epsilon=1e-5)(x).numpy()
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(layer_norm, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)


def test_groups_minus_one_is_not_rewritten():
    layer = kerasbn.GroupNorm(groups=-1)
    layer.build((None, 5, 6))
    assert layer.get_config()["groups"] == -1
    assert layer.group_count == 6
    clone = kerasbn.GroupNorm.from_config(layer.get_config())
    clone.build((None, 5, 10))  # reusable on another channel count
    assert clone.group_count == 10


@pytest.mark.parametrize("groups,channels", [(0, 8), (16, 8), (3, 8), (-2, 8)])
def test_bad_groups_fail_at_build_naming_both_numbers(groups, channels):
    layer = kerasbn.GroupNorm(groups=groups)
    with pytest.raises(ValueError, match="groups") as error:
        layer.build((None, 4, channels))
    assert str(groups) in str(error.value) and str(channels) in str(error.value)


@pytest.mark.parametrize(
    "kwargs,exception,name",
    [
        ({"groups": 2.0}, TypeError, "groups"),
        ({"axis": [1]}, TypeError, "axis"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"center": "yes"}, TypeError, "center"),
    ],
)
def test_bad_constructor_arguments_name_themselves(kwargs, exception, name):
    with pytest.raises(exception, match=f"`{name}`"):
        kerasbn.GroupNorm(**kwargs)


@pytest.mark.parametrize("axis", [3, 0])
def test_bad_axis_fails_at_build(axis):
    with pytest.raises(ValueError, match="`axis`"):
        kerasbn.GroupNorm(groups=1, axis=axis).build((None, 4, 4))


def test_mask_excludes_positions_from_each_samples_statistics(rng):
    x = rng.normal(1.0, 2.0, (3, 6, 4)).astype("float32")
    mask = rng.random((3, 6)) > 0.4
    mask[2] = False  # a fully masked sample gives beta
    layer = kerasbn.GroupNorm(groups=2, beta_initializer="ones")
    got = layer(x, mask=mask).numpy()
    expected = group_norm_reference(x, np.ones(4), np.ones(4), 2, 1e-3, -1, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[2], np.ones((6, 4)))
    with pytest.raises(ValueError, match="`mask`"):
        layer(x, mask=mask[:, :, None])


def test_padding_mask_from_embedding_reaches_the_layer(rng):
    tokens = np.array([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    inputs = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    model = keras.Model(inputs, kerasbn.GroupNorm(groups=2)(embedded))
    out = model(tokens).numpy()
    vectors = model.layers[1](tokens).numpy()
    expected = group_norm_reference(vectors, np.ones(4), np.zeros(4), 2, 1e-3, -1, tokens > 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_integer_input_is_normalized_in_float_unlike_keras(rng):
    x = rng.integers(-20, 100, (3, 5, 8)).astype("int32")
    expected = group_norm_reference(x, np.ones(8), np.zeros(8), 2, 1e-3, -1)
    ours = kerasbn.GroupNorm(groups=2)(x)
    assert ours.dtype == "float32"
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-5)
    # Keras' GroupNormalization casts its normalized values back to the input's
    # dtype, truncating them to integers: errors near 1. If this starts failing,
    # Keras fixed it.
    theirs = np.asarray(keras.layers.GroupNormalization(groups=2)(x), np.float64)
    assert np.abs(theirs - expected).max() > 0.5


def test_the_kernel_refuses_groups_that_do_not_divide_a_static_channel_count():
    """Its reshape target has -1 for the batch, which would absorb the mismatch."""

    @tf.function
    def call(x):
        return kerasbn.kernels.group_norm(
            x, None, None, groups=4, epsilon=1e-3, channel_axis=3
        )

    with pytest.raises(ValueError, match="`groups`"):
        call.get_concrete_function(tf.TensorSpec((None, 4, 4, 6)))
