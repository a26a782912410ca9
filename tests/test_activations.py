"""Fused activations (`activation=`), against Keras' own functions and layers.

References: `keras.activations.<name>` for each activation and TensorFlow's
autodiff of it for its derivative; for the layers, Keras' normalization layer
followed by Keras' activation (the unfused pair), differentiated by autodiff in
float64, to first and second order.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn.kernels.activations import (
    ACTIVATIONS, activate, activation_gradient, gradient_from_kept, kept_for_gradient
)
from kerasbn.kernels.build import Build


def gradients_both_ways(dy, z, name):
    """`dy · f'(z)` as XLA builds compute it (the formula in z) and as a graph run op by op does,
    from what it keeps for the backward (the output where f' is a function of it, else z)."""
    kept = kept_for_gradient(z, activate(z, name), name, Build(for_xla=False))
    return {"formula": activation_gradient(dy, z, name), "kept": gradient_from_kept(dy, kept, name)}

from platform_support import KERAS_HAS_RENORM, RENORM_SKIP_REASON

def exact_gelu(z):
    """z Φ(z) in float64. TensorFlow's float64 `gelu` (Keras' on this backend)
    is off by up to ~4e-7 relative (test below), so the layer tests use this."""
    return z * 0.5 * tf.math.erfc(-z / np.sqrt(2.0))


def reference_activation(name):
    return exact_gelu if name == "gelu" else keras.activations.get(name)


KINKS = {"relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "elu": (0.0,)}
KINKS["hard_sigmoid"] = KINKS["hard_silu"] = (-3.0, 3.0)


def away_from_kinks(values, name, margin=1e-3):
    for kink in KINKS.get(name, ()):
        values = np.where(np.abs(values - kink) < margin, kink + 2 * margin, values)
    return values


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_each_activation_and_its_derivative_match_keras(rng, name):
    z_np = away_from_kinks(rng.normal(0.0, 4.0, 2000), name)
    z_np[:4] = [-40.0, 40.0, -8.0, 8.0]  # saturated tails stay finite
    z = tf.constant(z_np)
    dy = tf.constant(rng.normal(size=z_np.shape))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z)
        keras_value = keras.activations.get(name)(z)
        reference_value = reference_activation(name)(z)
    expected_gradient = tape.gradient(reference_value, z, output_gradients=dy)
    np.testing.assert_allclose(activate(z, name), keras_value, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(activate(z, name), reference_value, rtol=1e-12, atol=1e-12)
    for way, gradient in gradients_both_ways(dy, z, name).items():
        np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-12, err_msg=way)


def test_exact_gelu_reference_matches_scipy_where_tensorflow_gelu_rounds():
    special = pytest.importorskip("scipy.special")
    z = np.linspace(-9.0, 9.0, 1001)
    exact = z * 0.5 * special.erfc(-z / np.sqrt(2.0))
    np.testing.assert_allclose(exact_gelu(tf.constant(z)), exact, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(activate(tf.constant(z), "gelu"), exact, rtol=1e-13, atol=1e-300)
    keras_error = np.max(np.abs(keras.activations.gelu(tf.constant(z)).numpy() - exact) / (np.abs(exact) + 1e-300))
    assert keras_error > 1e-9  # why the layer tests do not use it as the float64 reference


def test_derivatives_at_kinks_are_what_tensorflow_gives():
    for name in ("relu", "relu6", "leaky_relu", "hard_sigmoid", "hard_silu"):
        z = tf.constant([k for k in KINKS[name]], tf.float64)
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = keras.activations.get(name)(z)
        expected = tape.gradient(y, z)
        for way, gradient in gradients_both_ways(tf.ones_like(z), z, name).items():
            np.testing.assert_allclose(gradient, expected, err_msg=f"{name}, {way}")


# -- layers with a fused activation against the unfused Keras pair ----------------

RENORM_CLIPPING = {"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}


def pair(kind, activation, jit, axis=-1):
    """(ours with `activation`, Keras' layer) in float64."""
    if kind == "BatchNorm":
        ours = kerasbn.BatchNorm(axis=axis, activation=activation, dtype="float64", jit_compile=jit)
        theirs = keras.layers.BatchNormalization(axis=axis, dtype="float64")
    elif kind == "BatchRenorm":
        if not KERAS_HAS_RENORM:
            pytest.skip(RENORM_SKIP_REASON)
        ours = kerasbn.BatchRenorm(
            axis=axis, r_max=1.5, d_max=0.5, activation=activation, dtype="float64", jit_compile=jit
        )
        theirs = keras.layers.BatchNormalization(
            axis=axis, dtype="float64", renorm=True, renorm_clipping=RENORM_CLIPPING
        )
    else:
        ours = kerasbn.GroupNorm(
            groups=2, axis=axis, activation=activation, dtype="float64", jit_compile=jit
        )
        theirs = keras.layers.GroupNormalization(groups=2, axis=axis, dtype="float64")
    return ours, theirs


def same_weights(ours, theirs, shape, axis, rng):
    ours.build(shape)
    theirs.build(shape)
    channels = shape[axis]
    weights = [rng.normal(1.0, 0.3, channels), rng.normal(0.2, 0.5, channels)]
    if len(theirs.weights) > 2:
        weights += [rng.normal(0.0, 0.5, channels), rng.uniform(0.5, 2.0, channels)]
    if len(theirs.weights) > 4:  # renorm: stddevs and renorm statistics that clip r, d
        variance = weights[3]
        weights += [np.sqrt(variance + 1e-3), rng.normal(1.0, 0.5, channels), rng.uniform(0.3, 0.9, channels)]
    theirs.set_weights(weights)
    ours.set_weights(weights)


def outputs_and_gradients(layer, x, weight, activation=None, training=True, mask=None, traced=False):
    """y and d(Σ weight·sin(y))/d(x, γ, β); `activation` applied after `layer` if given.

    `traced`: in a `tf.function` (with these static shapes, a small input's
    kernel goes inline into it) rather than eagerly (the kernel's programs).
    """

    def step(x):
        sources = [x] + layer.trainable_weights
        with tf.GradientTape() as tape:
            tape.watch(x)
            kwargs = {} if mask is None else {"mask": mask}
            y = layer(x, training=training, **kwargs)
            if activation is not None:
                y = reference_activation(activation)(y)
            loss = tf.reduce_sum(weight * tf.sin(y))
        return [y] + tape.gradient(loss, sources)

    return [t.numpy() for t in (tf.function(step) if traced else step)(x)]


def check_against_keras(
    kind, activation, jit, rng, shape=(6, 3, 4), axis=-1, training=True, traced=False
):
    ours, theirs = pair(kind, activation, jit, axis)
    same_weights(ours, theirs, shape, axis, rng)
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    expected = outputs_and_gradients(theirs, x, weight, activation, training)
    actual = outputs_and_gradients(ours, x, weight, None, training, traced=traced)
    for name, a, e in zip(["y", "dx", "dgamma", "dbeta"], actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-10, err_msg=f"{kind} {activation} {name}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batch_norm_with_each_activation_matches_keras_pair(rng, activation):
    check_against_keras("BatchNorm", activation, True, rng)


@pytest.mark.parametrize("activation", ["relu6", "silu", "gelu"])
@pytest.mark.parametrize("kind", ["BatchRenorm", "GroupNorm"])
@pytest.mark.parametrize("jit", [True, False])
def test_renorm_and_group_norm_with_activation_match_keras_pair(rng, kind, activation, jit):
    check_against_keras(kind, activation, jit, rng, shape=(5, 3, 2, 4))


@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu", "silu"])
@pytest.mark.parametrize("kind", ["BatchNorm", "BatchRenorm", "GroupNorm"])
def test_inline_training_step_with_activation_matches_keras_pair(rng, kind, activation):
    # Traced with a small static shape, the kernel goes inline into the step,
    # keeps the pre-activation and takes TensorFlow's gradient op (ReluGrad...).
    check_against_keras(kind, activation, True, rng, shape=(5, 3, 2, 4), traced=True)


@pytest.mark.parametrize("kind", ["BatchNorm", "BatchRenorm", "GroupNorm"])
def test_channels_first_and_plain_kernels(rng, kind):
    check_against_keras(kind, "hard_silu", False, rng, shape=(4, 4, 3, 2), axis=1)


@pytest.mark.parametrize("activation", ["relu", "mish", "tanh"])
@pytest.mark.parametrize("kind", ["BatchNorm", "BatchRenorm"])
def test_inference_applies_the_activation_to_the_moving_statistics_output(rng, kind, activation):
    check_against_keras(kind, activation, True, rng, shape=(5, 2, 4), training=False)


def masked_batch_norm_float64(x, gamma, beta, mask, epsilon=1e-3):
    """Masked batch norm over every axis but the last, plain TF ops in float64."""
    w = tf.cast(mask, x.dtype)[..., None]
    axes = list(range(x.shape.rank - 1))
    count = tf.reduce_sum(w * tf.ones_like(x), axes, keepdims=True)
    mean = tf.reduce_sum(w * x, axes, keepdims=True) / count
    variance = tf.reduce_sum(w * (x - mean) ** 2, axes, keepdims=True) / count
    return gamma * (x - mean) / tf.sqrt(variance + epsilon) + beta


def test_masked_batch_norm_with_activation_matches_float64_formula(rng):
    # Keras' masked moments round to ~1e-8 in float64, so the reference is
    # the masked formula itself, differentiated by autodiff.
    shape = (5, 6, 3)
    layer = kerasbn.BatchNorm(activation="silu", dtype="float64")
    layer.build(shape)
    gamma, beta = rng.normal(1.0, 0.3, 3), rng.normal(0.2, 0.5, 3)
    layer.set_weights([gamma, beta, np.zeros(3), np.ones(3)])
    x_np = rng.normal(0.5, 2.0, shape)
    mask_np = rng.random(shape[:2]) > 0.3
    x_np[~mask_np] = 1e3  # far off: would dominate the statistics if it leaked in
    x, mask = tf.constant(x_np), tf.constant(mask_np)
    weight = tf.constant(rng.normal(size=shape))
    actual = outputs_and_gradients(layer, x, weight, mask=mask)
    gamma_t, beta_t = tf.constant(gamma), tf.constant(beta)
    with tf.GradientTape() as tape:
        tape.watch([x, gamma_t, beta_t])
        y = keras.activations.silu(masked_batch_norm_float64(x, gamma_t, beta_t, mask))
        loss = tf.reduce_sum(weight * tf.sin(y))
    expected = [y.numpy()] + [g.numpy() for g in tape.gradient(loss, [x, gamma_t, beta_t])]
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-9)


def penalty_gradients(layer, x, weight, activation=None):
    """d/d(x, weights) of ‖∂L/∂x‖² with L = Σ weight·sin(act(layer(x)))."""
    sources = [x] + layer.trainable_weights
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x, training=True)
            if activation is not None:
                y = reference_activation(activation)(y)
            loss = tf.reduce_sum(weight * tf.sin(y))
        penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
    return [g.numpy() for g in outer.gradient(penalty, sources)]


@pytest.mark.parametrize("kind,activation", [("BatchNorm", "gelu"), ("GroupNorm", "silu"), ("BatchRenorm", "elu")])
def test_second_order_gradients_match_keras_pair(rng, kind, activation):
    shape = (5, 3, 4)
    ours, theirs = pair(kind, activation, True)
    same_weights(ours, theirs, shape, -1, rng)
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    for a, e in zip(penalty_gradients(ours, x, weight), penalty_gradients(theirs, x, weight, activation)):
        np.testing.assert_allclose(a, e, rtol=1e-8, atol=1e-9)


def test_fused_activation_inside_an_xla_compiled_step_matches(rng):
    shape = (8, 4, 4, 6)
    ours, theirs = pair("GroupNorm", "relu", True)
    same_weights(ours, theirs, shape, -1, rng)
    x = tf.constant(rng.normal(size=shape))
    weight = tf.constant(rng.normal(size=shape))

    @tf.function(jit_compile=True)
    def ours_step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(weight * tf.sin(ours(x)))
        return tape.gradient(loss, [x] + ours.trainable_weights)

    expected = outputs_and_gradients(theirs, x, weight, "relu")[1:]
    for a, e in zip(ours_step(), expected):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-10)


# -- arguments and config -------------------------------------------------------------


@pytest.mark.parametrize("layer_class", [kerasbn.BatchNorm, kerasbn.BatchRenorm, kerasbn.GroupNorm])
def test_aliases_and_keras_functions_resolve_to_canonical_names(layer_class):
    kwargs = {"groups": 1} if layer_class is kerasbn.GroupNorm else {}
    cases = {
        None: None,
        "linear": None,
        keras.activations.linear: None,
        "swish": "silu",
        "hard_swish": "hard_silu",
        keras.activations.swish: "silu",
        keras.activations.relu6: "relu6",
        "gelu": "gelu",
    }
    for given, canonical in cases.items():
        layer = layer_class(activation=given, **kwargs)
        assert layer.activation == canonical
        assert layer.get_config()["activation"] == canonical
        assert layer_class.from_config(layer.get_config()).activation == canonical


@pytest.mark.parametrize(
    "bad",
    [
        "softmax",
        "Relu",
        lambda x: x,
        functools.partial(keras.activations.leaky_relu, negative_slope=0.1),
        keras.activations.softmax,
        3,
    ],
)
def test_unsupported_activations_raise_value_error_naming_the_argument(bad):
    for make in (kerasbn.BatchNorm, kerasbn.BatchRenorm, lambda **k: kerasbn.GroupNorm(groups=1, **k)):
        with pytest.raises(ValueError, match="`activation`"):
            make(activation=bad)


def test_keras_file_round_trip_keeps_the_fused_activation(tmp_path, rng):
    inputs = keras.Input((4, 4, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = kerasbn.BatchNorm(activation="relu6")(h)
    h = kerasbn.GroupNorm(groups=2, activation="swish")(h)
    model = keras.Model(inputs, h)
    x = rng.normal(size=(5, 4, 4, 3)).astype("float32")
    model(x, training=True)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.activation for layer in loaded.layers[2:]] == ["relu6", "silu"]
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_folded_export_keeps_the_activation(tmp_path, rng):
    inputs = keras.Input((6, 6, 3), name="image")
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = kerasbn.BatchNorm(activation="hard_silu", name="bn")(h)
    outputs = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(inputs, outputs)
    for variable in model.weights:
        variable.assign(rng.normal(0.5, 0.7, variable.shape).astype("float32") ** 2)
    x = rng.normal(size=(3, 6, 6, 3)).astype("float32")
    path = kerasbn.export_for_serving(model, str(tmp_path / "1"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    result = served(image=tf.constant(x))["pool"].numpy()
    np.testing.assert_allclose(result, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    ops = {node.op for f in served.graph.as_graph_def().library.function for node in f.node_def}
    # The normalization was folded into the conv: none of its ops is left.
    assert not ops & {"Rsqrt", "FusedBatchNormV3"}
