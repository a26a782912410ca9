"""Gradients of gradients (gradient penalties, Hessian-vector products, forward mode).

Our kernels' hand-derived first-order gradients treat the batch statistics as
constants; differentiating them again must still see how the statistics depend
on the input. References: Keras' own layers (plain autodiff, exact to any
order) and central differences of the first-order gradient.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.eager import record

import kerasbn
from kerasbn import kernels
from kerasbn.kernels.engine import kernel as compile_kernel
from platform_support import keras_batch_renorm
from references import central_differences


def penalty_gradients(layer, x, weight, mask=None):
    """d/d(x, weights) of ‖∂L/∂x‖² + ‖∂L/∂γ‖², with L = Σ weight · sin(layer(x))."""
    sources = [x] + layer.trainable_weights
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x, training=True) if mask is None else layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(weight * tf.sin(y))
        dx, dgamma = inner.gradient(loss, [x, layer.trainable_weights[0]])
        penalty = tf.reduce_sum(dx**2) + tf.reduce_sum(dgamma**2)
    return [g.numpy() for g in outer.gradient(penalty, sources)]


RENORM_CLIPPING = {"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}

PAIRS = {
    "BatchNorm": (
        lambda jit: kerasbn.BatchNorm(dtype="float64", jit_compile=jit),
        lambda: keras.layers.BatchNormalization(dtype="float64"),
    ),
    "BatchRenorm": (
        lambda jit: kerasbn.BatchRenorm(r_max=1.5, d_max=0.5, dtype="float64", jit_compile=jit),
        lambda: keras_batch_renorm(dtype="float64", renorm_clipping=RENORM_CLIPPING),
    ),
    "GroupNorm": (
        lambda jit: kerasbn.GroupNorm(groups=2, dtype="float64", jit_compile=jit),
        lambda: keras.layers.GroupNormalization(groups=2, dtype="float64"),
    ),
}


def set_same_weights(ours, theirs, shape, rng):
    ours.build(shape)
    theirs.build(shape)
    channels = shape[-1]
    gamma, beta = rng.normal(1.0, 0.3, channels), rng.normal(0.0, 0.3, channels)
    # For the renorm layers: statistics that make r and d clip in some channels.
    renorm_mean, renorm_stddev = rng.normal(0.0, 1.0, channels), rng.uniform(0.3, 3.0, channels)
    for layer in (ours, theirs):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        if hasattr(layer, "renorm_stddev"):
            layer.renorm_mean.assign(renorm_mean)
            layer.renorm_stddev.assign(renorm_stddev)


@pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "plain"])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_second_order_matches_keras(name, jit_compile, rng):
    make_ours, make_theirs = PAIRS[name]
    ours, theirs = make_ours(jit_compile), make_theirs()
    shape = (3, 4, 4, 4)
    set_same_weights(ours, theirs, shape, rng)
    x = tf.constant(rng.normal(2.0, 3.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    expected = penalty_gradients(theirs, x, weight)
    for got, want in zip(penalty_gradients(ours, x, weight), expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    # The check can fail: the penalty's gradient is far from zero.
    assert np.abs(expected[0]).max() > 1.0


def test_masked_batch_norm_second_order_matches_keras(rng):
    shape = (4, 6, 3)
    ours = kerasbn.BatchNorm(dtype="float64")
    theirs = keras.layers.BatchNormalization(dtype="float64")
    set_same_weights(ours, theirs, shape, rng)
    x = tf.constant(rng.normal(size=shape))
    weight = tf.constant(rng.normal(size=shape))
    mask = tf.constant(rng.random(shape[:-1]) > 0.3)
    expected = penalty_gradients(theirs, x, weight, mask)
    # Keras divides masked sums by count + 1e-7, hence 1e-5 and not 1e-9.
    for got, want in zip(penalty_gradients(ours, x, weight, mask), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_masked_group_norm_second_order_matches_finite_differences(rng):
    # Keras' GroupNormalization ignores masks: differentiate our (tested)
    # first-order gradient numerically instead.
    shape = (2, 3, 4)
    layer = kerasbn.GroupNorm(groups=2, dtype="float64")
    layer.build(shape)
    layer.gamma.assign(rng.normal(1.0, 0.3, 4))
    x0 = rng.normal(size=shape)
    weight = tf.constant(rng.normal(size=shape))
    mask = tf.constant(rng.random(shape[:-1]) > 0.3)

    def penalty(x):
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(weight * tf.sin(layer(x, mask=mask)))
        return tf.reduce_sum(tape.gradient(loss, x) ** 2)

    x = tf.constant(x0)
    with tf.GradientTape() as outer:
        outer.watch(x)
        value = penalty(x)
    analytic = outer.gradient(value, x).numpy()
    np.testing.assert_allclose(analytic, central_differences(penalty, x0), rtol=1e-5, atol=1e-6)


def test_gradient_penalty_in_a_compiled_train_step(rng):
    # The WGAN-GP pattern inside `tf.function(jit_compile=True)`, against eager Keras.
    shape = (8, 5)
    ours = kerasbn.BatchNorm(dtype="float64")
    theirs = keras.layers.BatchNormalization(dtype="float64")
    set_same_weights(ours, theirs, shape, rng)
    x = tf.constant(rng.normal(size=shape))
    weight = tf.constant(rng.normal(size=shape))

    def penalty_step(layer, x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(weight * tf.sin(layer(x, training=True)))
            penalty = tf.reduce_sum(inner.gradient(loss, x) ** 2)
        return outer.gradient(penalty, [x, layer.gamma, layer.beta])

    compiled = tf.function(lambda x: penalty_step(ours, x), jit_compile=True)
    for got, want in zip(compiled(x), penalty_step(theirs, x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-9)


def test_first_order_gradients_are_unchanged_under_an_outer_tape(rng):
    # A recording outer tape takes the exact path; the first-order values must
    # be the hand-derived ones.
    layer = kerasbn.BatchNorm()
    x = tf.constant(rng.normal(size=(6, 4)).astype("float32"))
    with tf.GradientTape() as plain:
        plain.watch(x)
        loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
    expected = plain.gradient(loss, x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        got = inner.gradient(loss, x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_of", [tf.sin, lambda y: 3.0 * y], ids=["sin", "linear"])
def test_synchronized_second_order_raises(rng, loss_of):
    # A loss linear in y leaves its upstream gradient unwatched: the refusal
    # must not depend on it.
    x = tf.constant(rng.normal(size=(6, 3)))
    gamma, beta = tf.ones(3, tf.float64), tf.zeros(3, tf.float64)
    moving_mean, moving_variance = tf.zeros(3, tf.float64), tf.ones(3, tf.float64)

    def single_replica_sum(tensors):
        return list(tensors)

    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y, _ = kernels.train_step(
                x,
                gamma,
                beta,
                {"moving_mean": moving_mean, "moving_variance": moving_variance},
                None,
                all_reduce=single_replica_sum,
                momentum=0.9,
                epsilon=1e-3,
                feature_axes=(1,),
            )
            loss = tf.reduce_sum(loss_of(y))
        with pytest.raises(NotImplementedError, match="synchronized=True"):
            inner.gradient(loss, x)


def forward_over_backward_hvp(layer, x, weight, tangent):
    """H·v of L = Σ weight · sin(layer(x)), a forward accumulator over a tape."""
    with tf.autodiff.ForwardAccumulator(x, tangent) as accumulator:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(weight * tf.sin(layer(x, training=True)))
        gradient = tape.gradient(loss, x)
    return accumulator.jvp(gradient).numpy()


def keras_hvp_by_differences(layer, x, weight, tangent, step=1e-5):
    """H·v by central differences of the Keras layer's first-order gradient.

    Keras' layers are not a reference for H·v itself: `tf.nn.moments` stops
    the gradient of the mean inside the variance, which is exact to first
    order only (the error vanishes along directions v that sum to zero).
    Weights are restored before each call (training updates the statistics).
    """
    saved = [w.numpy() for w in layer.weights]

    def gradient(point):
        for variable, value in zip(layer.weights, saved):
            variable.assign(value)
        with tf.GradientTape() as tape:
            tape.watch(point)
            loss = tf.reduce_sum(weight * tf.sin(layer(point, training=True)))
        return tape.gradient(loss, point).numpy()

    return (gradient(x + step * tangent) - gradient(x - step * tangent)) / (2 * step)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_forward_over_backward_hessian_vector_product(name, rng):
    make_ours, make_theirs = PAIRS[name]
    ours, theirs = make_ours(True), make_theirs()
    shape = (3, 4, 4, 4)
    set_same_weights(ours, theirs, shape, rng)
    if name == "BatchRenorm":
        # Differences of the gradient would also move r and d, which the
        # gradient treats as constants: make both clip in every channel.
        for layer in (ours, theirs):
            layer.renorm_stddev.assign(np.full(4, 0.05))
            layer.renorm_mean.assign(np.full(4, -50.0))
    x = tf.constant(rng.normal(2.0, 3.0, shape))
    weight, tangent = tf.constant(rng.normal(size=shape)), tf.constant(rng.normal(size=shape))
    expected = keras_hvp_by_differences(theirs, x, weight, tangent)
    got = forward_over_backward_hvp(ours, x, weight, tangent)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.abs(expected).max() > 0.1


def test_backward_traced_while_taping_is_paused_still_differentiates(rng):
    # A fresh kernel whose backward program is first traced with the thread's
    # taping stopped (as inside a forward accumulator's JVP computation): its
    # gradients then, and ever after, must be right, not None.
    fresh = compile_kernel(kernels.normalize_batch.fn)
    x = tf.constant(rng.normal(size=(6, 3)))
    weight = tf.constant(rng.normal(size=(6, 3)))
    gamma, beta = tf.constant([1.0, 2.0, 0.5], tf.float64), tf.zeros(3, tf.float64)

    def gradient(paused):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _ = fresh(x, gamma, beta, epsilon=1e-3, feature_axes=(1,))
            loss = tf.reduce_sum(weight * y)
        if paused:
            with record.stop_recording():
                return tape.gradient(loss, x)
        return tape.gradient(loss, x)

    reference = keras.layers.BatchNormalization(epsilon=1e-3, dtype="float64")
    reference.build((6, 3))
    reference.gamma.assign(gamma)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(weight * reference(x, training=True))
    expected = tape.gradient(loss, x).numpy()
    for paused in (True, False):
        got = gradient(paused)
        assert got is not None
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
