"""The hand-derived gradient against autodiff and finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn


def formula_float64(x, gamma, beta, axes, epsilon, mask=None):
    """Batch norm written with plain TF ops in float64, for autodiff."""
    if mask is None:
        mean, var = tf.nn.moments(x, axes, keepdims=True)
    else:
        w = tf.cast(mask, x.dtype)
        count = tf.reduce_sum(w * tf.ones_like(x), axes, keepdims=True)
        mean = tf.reduce_sum(tf.where(mask, x, 0.0), axes, keepdims=True) / count
        var = tf.reduce_sum(tf.where(mask, (x - mean) ** 2, 0.0), axes, keepdims=True) / count
    return gamma * (x - mean) / tf.sqrt(var + epsilon) + beta


def run_mode(fn, mode):
    if mode == "eager":
        return fn()
    return tf.function(fn, jit_compile=(mode == "xla"))()


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("shape,axis", [((6, 5), -1), ((4, 3, 5, 2), -1), ((3, 4, 5, 2), 1)])
def test_gradients_match_keras_layer(rng, mode, shape, axis):
    x = tf.constant(rng.normal(1.0, 2.0, shape).astype("float32"))
    weight = tf.constant(rng.normal(size=shape).astype("float32"))
    ours = kerasbn.BatchNorm(axis=axis)
    theirs = keras.layers.BatchNormalization(axis=axis)
    ours.build(shape)
    theirs.build(shape)
    channels = shape[axis]
    theirs.set_weights(
        [rng.normal(1, 0.3, channels), rng.normal(0, 0.3, channels), np.zeros(channels), np.ones(channels)]
    )
    ours.set_weights(theirs.get_weights())

    def grads(layer):
        def fn():
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=True) ** 2 * weight)
            return tape.gradient(loss, [x, layer.gamma, layer.beta])

        return [g.numpy() for g in run_mode(fn, mode)]

    for ours_grad, theirs_grad in zip(grads(ours), grads(theirs)):
        np.testing.assert_allclose(ours_grad, theirs_grad, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_autodiff_of_float64_formula(rng, jit_compile, masked):
    shape = (5, 4, 3)
    x = tf.constant(rng.normal(0.5, 1.5, shape))
    mask_np = rng.random(shape[:2]) > 0.3 if masked else None
    weight = tf.constant(rng.normal(size=shape))
    layer = kerasbn.BatchNorm(dtype="float64", jit_compile=jit_compile)
    layer.build(shape)
    layer.gamma.assign(rng.normal(1.0, 0.3, 3))
    layer.beta.assign(rng.normal(0.0, 0.3, 3))
    mask = None if mask_np is None else tf.constant(mask_np)

    with tf.GradientTape() as tape:
        tape.watch(x)
        ours_loss = tf.reduce_sum(layer(x, training=True, mask=mask) * weight)
    ours = tape.gradient(ours_loss, [x, layer.gamma, layer.beta])

    gamma = tf.constant(layer.gamma.numpy())
    beta = tf.constant(layer.beta.numpy())
    broadcast_mask = None if mask is None else mask[..., None]
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        ref_loss = tf.reduce_sum(formula_float64(x, gamma, beta, [0, 1], 1e-3, broadcast_mask) * weight)
    reference = tape.gradient(ref_loss, [x, gamma, beta])
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_finite_differences(rng, masked):
    shape = (4, 3, 2)
    x0 = rng.normal(0.0, 1.0, shape)
    mask = tf.constant(rng.random(shape[:2]) > 0.3) if masked else None
    layer = kerasbn.BatchNorm(dtype="float64", epsilon=1e-2)
    layer.build(shape)
    layer.gamma.assign([1.5, -0.7])
    weight = tf.constant(rng.normal(size=shape))

    def loss_of_x(x):
        return tf.reduce_sum(layer(x, training=True, mask=mask) * weight)

    theoretical, numerical = tf.test.compute_gradient(loss_of_x, [tf.constant(x0)], delta=1e-6)
    np.testing.assert_allclose(theoretical[0], numerical[0], rtol=1e-6, atol=1e-7)

    def loss_of_gamma(gamma):
        layer.gamma.assign(gamma)
        with tf.GradientTape() as tape:
            loss = loss_of_x(tf.constant(x0))
        return loss, tape.gradient(loss, layer.gamma)

    gamma0 = np.array([1.5, -0.7])
    _, analytic = loss_of_gamma(gamma0)
    for i in range(2):
        step = np.zeros(2)
        step[i] = 1e-6
        numeric = (loss_of_gamma(gamma0 + step)[0] - loss_of_gamma(gamma0 - step)[0]) / 2e-6
        np.testing.assert_allclose(analytic.numpy()[i], numeric.numpy(), rtol=1e-6)


def test_inference_gradient_is_the_affine_map(rng):
    layer = kerasbn.BatchNorm()
    x = tf.constant(rng.normal(size=(4, 3)).astype("float32"))
    layer.build(x.shape)
    layer.moving_variance.assign([4.0, 1.0, 0.25])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=False))
    dx = tape.gradient(loss, x).numpy()
    np.testing.assert_allclose(dx, np.broadcast_to(1 / np.sqrt([4.001, 1.001, 0.251]), (4, 3)), rtol=1e-6)
