"""Ghost batch normalization: `virtual_batch_size=` on BatchNorm and BatchRenorm.

References: float64 NumPy on each contiguous ghost batch (outputs, both
moving-statistics rules, the partial last ghost batch, masks, renorm's per-ghost
corrections); tf_keras' `BatchNormalization(virtual_batch_size=v)` where its
semantics agree with ours (a batch divisible by v, its moving-statistics rule),
its strided ghost batches reproduced by a permutation of the examples;
TensorFlow's autodiff of a float64 formula and central differences for the
gradients, to second order. The XLA programs run from the first call
(`xla_policy(warmup_calls=0, min_elements=0)`, small as the inputs are); the
plain path is `jit_compile=False`.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras
from tensorflow.python.tools import saved_model_utils

import kerasbn
from kerasbn import kernels
from references import central_differences, feature_axes_of

EPSILON = 1e-3
MODES = pytest.mark.parametrize("jit_compile", [True, False], ids=["xla", "plain"])


@pytest.fixture(autouse=True)
def _xla_from_the_first_call():
    with kernels.xla_policy(warmup_calls=0, min_elements=0):
        yield


# -- float64 references ------------------------------------------------------------


def ghost_slices(batch, v):
    """Contiguous ghost batches: examples 0..v-1, v..2v-1, ..., and the remainder."""
    return [slice(start, min(start + v, batch)) for start in range(0, batch, v)]


def ghost_reference(x, v, axis=-1, gamma=None, beta=None, mask=None, renorm=None):
    """Ghost batch norm in float64 NumPy, one ghost batch at a time.

    `renorm` is None or `(renorm_mean, renorm_stddev, r_max, d_max)`: Ioffe's
    corrections per ghost batch. Returns `(y, ghosts)` with `ghosts` a list of
    per-feature `(count, mean, variance)`, one per ghost batch.
    """
    x = np.asarray(x, np.float64)
    features = feature_axes_of(axis, x.ndim)
    reduce = tuple(a for a in range(x.ndim) if a not in features)
    shape = [x.shape[a] if a in features else 1 for a in range(x.ndim)]
    g = np.ones(shape) if gamma is None else np.reshape(gamma, shape)
    b = np.zeros(shape) if beta is None else np.reshape(beta, shape)
    weights = np.ones(x.shape)
    if mask is not None:
        w = np.asarray(mask, np.float64)
        for a in features:
            w = np.expand_dims(w, a)
        weights = np.broadcast_to(w, x.shape)
    y = np.empty_like(x)
    ghosts = []
    for part in ghost_slices(len(x), v):
        xs, ws = x[part], weights[part]
        count = ws.sum(axis=reduce, keepdims=True)
        safe = np.where(ws > 0, xs, 0.0)
        mean = safe.sum(axis=reduce, keepdims=True) / np.maximum(count, 1)
        var = (ws * (safe - mean) ** 2).sum(axis=reduce, keepdims=True) / np.maximum(count, 1)
        inv = np.where(count > 0, 1 / np.sqrt(var + EPSILON), 0.0)
        xhat = (xs - mean) * inv
        if renorm is not None:
            renorm_mean, renorm_stddev, r_max, d_max = renorm
            sigma = np.maximum(np.reshape(renorm_stddev, shape), np.sqrt(EPSILON))
            r = np.clip(np.sqrt(var + EPSILON) / sigma, 1 / r_max, r_max)
            d = np.clip((mean - np.reshape(renorm_mean, shape)) / sigma, -d_max, d_max)
            xhat = xhat * np.where(count > 0, r, 1.0) + np.where(count > 0, d, 0.0)
        y[part] = g * xhat + b
        ghosts.append(tuple(np.broadcast_to(s, mean.shape).reshape(-1) for s in (count, mean, var)))
    return y, ghosts


def whole_batch_statistics(x, axis=-1, mask=None):
    """The "batch" rule's reference: mean and biased variance of the whole batch."""
    x = np.asarray(x, np.float64)
    features = feature_axes_of(axis, x.ndim)
    moved = np.moveaxis(x, features, range(x.ndim - len(features), x.ndim))
    flat = moved.reshape(-1, int(np.prod([x.shape[a] for a in features])))
    if mask is not None:
        flat = flat[np.asarray(mask).reshape(-1)]
    return flat.mean(axis=0), flat.var(axis=0)


def pooled_ghost_variance(ghosts):
    """The "ghost_mean" rule's variance: Σ N_g σ²_g / Σ N_g."""
    counts = np.stack([c for c, _, _ in ghosts])
    variances = np.stack([v for _, _, v in ghosts])
    return (counts * variances).sum(axis=0) / counts.sum(axis=0)


def ghost_formula_float64(x, gamma, beta, v, mask=None):
    """Ghost batch norm with plain TF ops in float64 (channels-last), for autodiff."""
    outputs = []
    axes = list(range(x.shape.rank - 1))
    for part in ghost_slices(x.shape[0], v):
        xs = x[part]
        if mask is None:
            mean, var = tf.nn.moments(xs, axes, keepdims=True)
        else:
            m = tf.cast(mask[part][..., None], x.dtype) * tf.ones_like(xs)
            count = tf.reduce_sum(m, axes, keepdims=True)
            mean = tf.reduce_sum(m * xs, axes, keepdims=True) / count
            var = tf.reduce_sum(m * (xs - mean) ** 2, axes, keepdims=True) / count
        outputs.append(gamma * (xs - mean) / tf.sqrt(var + EPSILON) + beta)
    return tf.concat(outputs, axis=0)


def train_call(layer, x, mask=None):
    """One training call; returns the output as a NumPy array."""
    return layer(tf.constant(x), training=True, mask=None if mask is None else tf.constant(mask)).numpy()


def randomized(layer, shape, rng):
    layer.build(shape)
    channels = layer.gamma.shape
    layer.gamma.assign(rng.normal(1.0, 0.3, channels))
    layer.beta.assign(rng.normal(0.0, 0.3, channels))
    return layer


# -- outputs against float64 NumPy -----------------------------------------------------


@MODES
@pytest.mark.parametrize(
    "shape,axis,v",
    [
        ((16, 3, 4), -1, 4),  # divisible: four ghost batches
        ((19, 3, 4), -1, 4),  # partial last ghost batch of 3
        ((5, 6, 2, 3), 1, 8),  # channels-first, batch smaller than v: one ghost batch
        ((10, 4, 3, 2), [1, 3], 3),  # two feature axes, last ghost batch of 1 example
    ],
)
def test_outputs_and_moving_statistics_match_float64_numpy(rng, jit_compile, shape, axis, v):
    x = rng.normal(3.0, 2.0, shape).astype("float32")
    layer = randomized(kerasbn.BatchNorm(axis=axis, momentum=0.75, virtual_batch_size=v, jit_compile=jit_compile), shape, rng)
    before_mean, before_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    y = train_call(layer, x)
    expected, _ = ghost_reference(x, v, axis, layer.gamma.numpy(), layer.beta.numpy())
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-5)
    mean, var = whole_batch_statistics(x, axis)
    feature_shape = layer.moving_mean.shape
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.75 * before_mean + 0.25 * mean.reshape(feature_shape), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.75 * before_var + 0.25 * var.reshape(feature_shape), rtol=1e-5)


@MODES
def test_masked_ghost_batches_match_float64_numpy(rng, jit_compile):
    shape, v = (11, 5, 3), 4
    x = rng.normal(-2.0, 3.0, shape).astype("float32")
    mask = rng.random(shape[:2]) > 0.3
    x[~mask] = np.nan  # masked values never reach the statistics
    mask[4:8] = False  # the second ghost batch is fully masked: it outputs beta
    x[4:8] = rng.normal(size=x[4:8].shape)
    layer = randomized(kerasbn.BatchNorm(momentum=0.0, virtual_batch_size=v, jit_compile=jit_compile), shape, rng)
    y = train_call(layer, x, mask)
    expected, ghosts = ghost_reference(x, v, -1, layer.gamma.numpy(), layer.beta.numpy(), mask)
    np.testing.assert_allclose(y[mask], expected[mask], rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(y[4:8], np.broadcast_to(layer.beta.numpy(), y[4:8].shape), atol=1e-6)
    mean, var = whole_batch_statistics(x, -1, mask)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-5)


@MODES
def test_ghost_mean_rule_is_the_size_weighted_mean_of_ghost_statistics(rng, jit_compile):
    shape, v = (14, 3, 2), 4  # ghost batches of 4, 4, 4 and 2
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    x[4:8] += 5.0  # ghost means far apart: the two rules differ
    layer = kerasbn.BatchNorm(momentum=0.0, virtual_batch_size=v, moving_statistics="ghost_mean", jit_compile=jit_compile)
    train_call(layer, x)
    _, ghosts = ghost_reference(x, v)
    mean, var = whole_batch_statistics(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), pooled_ghost_variance(ghosts), rtol=1e-5)
    assert np.all(var > pooled_ghost_variance(ghosts) + 1.0)


def test_the_batch_rule_agrees_with_recalibrate_and_ghost_mean_does_not(rng):
    x = rng.normal(0.0, 1.0, (32, 4)).astype("float32")
    x[:8] += 3.0

    def trained_then_recalibrated(rule):
        inputs = keras.Input((4,))
        layer = kerasbn.BatchNorm(momentum=0.0, virtual_batch_size=8, moving_statistics=rule)
        model = keras.Model(inputs, layer(inputs))
        model(x, training=True)
        trained = layer.moving_variance.numpy().copy()
        kerasbn.recalibrate(model, x, batch_size=32, verbose=0)
        return trained, layer.moving_variance.numpy()

    trained, recalibrated = trained_then_recalibrated("batch")
    np.testing.assert_allclose(trained, recalibrated, rtol=1e-5)
    trained, recalibrated = trained_then_recalibrated("ghost_mean")
    assert np.all(trained < recalibrated - 0.5)


# -- against tf_keras ------------------------------------------------------------------


def strided_order(batch, v):
    """The permutation putting tf_keras' ghost batches next to each other.

    tf_keras reshapes the batch to [v, B/v, ...]: its ghost batch j holds
    examples j, j + B/v, j + 2B/v, ... Ours are contiguous, so feeding ours
    `x[order]` makes our ghost batch j hold exactly tf_keras' ghost batch j.
    """
    groups = batch // v
    return np.array([j + i * groups for j in range(groups) for i in range(v)])


def tf_keras_step(layer, x, weight):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(tf.sin(y) * weight)
    grads = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    return [y.numpy()] + [g.numpy() for g in grads]


@MODES
@pytest.mark.parametrize("shape,axis", [((12, 5, 3), -1), ((8, 3, 2, 2), 1)])
def test_matches_tf_keras_virtual_batch_size_up_to_the_strided_order(rng, jit_compile, shape, axis):
    v = 4
    x = rng.normal(2.0, 3.0, shape).astype("float32")
    weight = rng.normal(size=shape).astype("float32")
    theirs = tf_keras.layers.BatchNormalization(axis=axis, momentum=0.5, virtual_batch_size=v)
    theirs.build(shape)
    ours = kerasbn.BatchNorm(axis=axis, momentum=0.5, virtual_batch_size=v, moving_statistics="ghost_mean", jit_compile=jit_compile)
    ours.build(shape)
    channels = shape[axis]
    gamma, beta = rng.normal(1.0, 0.3, channels), rng.normal(0.0, 0.3, channels)
    # tf_keras' weights have an extra leading axis with virtual_batch_size.
    for layer in (theirs, ours):
        layer.gamma.assign(np.reshape(gamma, layer.gamma.shape))
        layer.beta.assign(np.reshape(beta, layer.beta.shape))
    order = strided_order(shape[0], v)
    back = np.argsort(order)
    y_t, dx_t, dgamma_t, dbeta_t = tf_keras_step(theirs, x, weight)
    y_o, dx_o, dgamma_o, dbeta_o = tf_keras_step(ours, x[order], weight[order])
    np.testing.assert_allclose(y_o[back], y_t, atol=2e-5)
    np.testing.assert_allclose(dx_o[back], dx_t, atol=2e-5)
    np.testing.assert_allclose(dgamma_o, dgamma_t.reshape(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dbeta_o, dbeta_t.reshape(-1), rtol=1e-4, atol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(
            getattr(ours, name).numpy(), getattr(theirs, name).numpy().reshape(-1), rtol=1e-5, atol=1e-6
        )


def test_renorm_moving_statistics_match_tf_keras_under_its_rule(rng):
    # tf_keras takes one r and d from the averaged ghost statistics (its
    # outputs differ from ours); its moving and renorm averages follow the
    # averaged statistics, which is the "ghost_mean" rule.
    shape, v = (12, 4, 3), 3
    x = rng.normal(4.0, 2.0, shape).astype("float32")
    theirs = tf_keras.layers.BatchNormalization(
        momentum=0.5,
        virtual_batch_size=v,
        renorm=True,
        renorm_momentum=0.7,
        renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
    )
    ours = kerasbn.BatchRenorm(
        momentum=0.5, renorm_momentum=0.7, r_max=1.5, d_max=0.5, virtual_batch_size=v, moving_statistics="ghost_mean"
    )
    theirs(x, training=True)
    train_call(ours, x[strided_order(12, v)])
    for name in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"):
        np.testing.assert_allclose(
            getattr(ours, name).numpy(), getattr(theirs, name).numpy().reshape(-1), rtol=1e-5, atol=1e-6
        )


# -- BatchRenorm ------------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("rule", ["batch", "ghost_mean"])
def test_batch_renorm_corrects_each_ghost_batch_toward_the_renorm_averages(rng, jit_compile, rule):
    shape, v = (10, 3, 4), 4  # ghost batches of 4, 4 and 2
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    x[4:8] *= 4.0  # one ghost batch with a much larger spread: r clips there
    layer = kerasbn.BatchRenorm(
        r_max=1.5, d_max=0.5, momentum=0.5, renorm_momentum=0.8, virtual_batch_size=v, moving_statistics=rule, jit_compile=jit_compile
    )
    randomized(layer, shape, rng)
    renorm_mean, renorm_stddev = rng.normal(1.0, 0.5, 4), rng.uniform(0.5, 3.0, 4)
    layer.renorm_mean.assign(renorm_mean)
    layer.renorm_stddev.assign(renorm_stddev)
    state = {name: getattr(layer, name).numpy() for name in ("moving_mean", "moving_stddev")}
    y = train_call(layer, x)
    expected, ghosts = ghost_reference(
        x, v, -1, layer.gamma.numpy(), layer.beta.numpy(), renorm=(renorm_mean, renorm_stddev, 1.5, 0.5)
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-5)
    mean, var = whole_batch_statistics(x)
    if rule == "ghost_mean":
        var = pooled_ghost_variance(ghosts)
    stddev = np.sqrt(var + EPSILON)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * state["moving_mean"] + 0.5 * mean, rtol=1e-5)
    moving_stddev = 0.5 * state["moving_stddev"] + 0.5 * stddev
    np.testing.assert_allclose(layer.moving_stddev.numpy(), moving_stddev, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moving_stddev**2 - EPSILON, rtol=1e-5)
    np.testing.assert_allclose(layer.renorm_mean.numpy(), 0.8 * renorm_mean + 0.2 * mean, rtol=1e-5)
    np.testing.assert_allclose(layer.renorm_stddev.numpy(), 0.8 * renorm_stddev + 0.2 * stddev, rtol=1e-5)


def test_batch_renorm_without_corrections_is_ghost_batch_norm(rng):
    x = rng.normal(2.0, 3.0, (9, 4, 3)).astype("float32")
    renorm = kerasbn.BatchRenorm(r_max=1.0, d_max=0.0, virtual_batch_size=4)
    plain = kerasbn.BatchNorm(virtual_batch_size=4)
    np.testing.assert_allclose(train_call(renorm, x), train_call(plain, x), atol=1e-6)
    np.testing.assert_allclose(renorm.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-6)


# -- gradients ---------------------------------------------------------------------------


def float64_layer(v, jit_compile, shape, rng, **kwargs):
    layer = kerasbn.BatchNorm(dtype="float64", virtual_batch_size=v, jit_compile=jit_compile, **kwargs)
    return randomized(layer, shape, rng)


@MODES
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_gradients_match_autodiff_of_a_float64_formula(rng, jit_compile, masked):
    shape, v = (11, 3, 4), 4  # ghost batches of 4, 4 and 3
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    mask = tf.constant(rng.random(shape[:2]) > 0.3) if masked else None
    layer = float64_layer(v, jit_compile, shape, rng)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.sin(layer(x, training=True, mask=mask)) * weight)
    ours = tape.gradient(loss, [x, layer.gamma, layer.beta])
    gamma, beta = tf.constant(layer.gamma.numpy()), tf.constant(layer.beta.numpy())
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        loss = tf.reduce_sum(tf.sin(ghost_formula_float64(x, gamma, beta, v, mask)) * weight)
    expected = tape.gradient(loss, [x, gamma, beta])
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-10)


@MODES
def test_gradients_match_central_differences(rng, jit_compile):
    shape, v = (4, 2, 2), 3  # ghost batches of 3 and 1 (zero variance)
    x0 = rng.normal(0.0, 1.5, shape)
    weight = tf.constant(rng.normal(size=shape))
    layer = float64_layer(v, jit_compile, shape, rng, activation="gelu")

    def loss(x):
        return tf.reduce_sum(tf.sin(layer(tf.constant(x), training=True)) * weight)

    x = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x)
    np.testing.assert_allclose(tape.gradient(value, x).numpy(), central_differences(loss, x0), rtol=1e-6, atol=1e-7)


@MODES
def test_gradients_of_gradients_match_autodiff_of_a_float64_formula(rng, jit_compile):
    shape, v = (6, 3, 2), 4  # ghost batches of 4 and 2
    x = tf.constant(rng.normal(1.0, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    layer = float64_layer(v, jit_compile, shape, rng)
    gamma, beta = tf.constant(layer.gamma.numpy()), tf.constant(layer.beta.numpy())

    def penalty_gradient(forward, parameters):
        # Layer weights are watched by the tapes; the reference's are tensors.
        watched = [x] + [p for p in parameters if isinstance(p, tf.Tensor)]
        with tf.GradientTape() as outer:
            outer.watch(watched)
            with tf.GradientTape() as inner:
                inner.watch(watched)
                loss = tf.reduce_sum(weight * tf.sin(forward()))
            dx, dgamma = inner.gradient(loss, [x, parameters[0]])
            penalty = tf.reduce_sum(dx**2) + tf.reduce_sum(dgamma**2)
        return [g.numpy() for g in outer.gradient(penalty, [x] + parameters)]

    ours = penalty_gradient(lambda: layer(x, training=True), [layer.gamma, layer.beta])
    expected = penalty_gradient(lambda: ghost_formula_float64(x, gamma, beta, v), [gamma, beta])
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert np.abs(expected[0]).max() > 1.0  # the check can fail


# -- fused activation and mixed precision -------------------------------------------------


@MODES
def test_fused_activation_matches_the_reference_followed_by_keras_activation(rng, jit_compile):
    shape, v = (10, 3, 4), 4
    x = rng.normal(0.0, 2.0, shape).astype("float32")
    layer = randomized(kerasbn.BatchNorm(virtual_batch_size=v, activation="relu", jit_compile=jit_compile), shape, rng)
    expected, _ = ghost_reference(x, v, -1, layer.gamma.numpy(), layer.beta.numpy())
    np.testing.assert_allclose(train_call(layer, x), np.maximum(expected, 0.0), atol=2e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_float32_statistics(rng, policy):
    keras.config.set_dtype_policy(policy)
    shape, v = (9, 4, 3), 4
    x = (1e5 + rng.normal(0.0, 3.0, shape)).astype("float32")  # above float16's range
    layer = kerasbn.BatchNorm(momentum=0.0, virtual_batch_size=v)
    y = layer(tf.constant(x), training=True)
    assert y.dtype == layer.compute_dtype and layer.moving_variance.dtype == "float32"
    expected, _ = ghost_reference(x, v)
    tolerance = 1e-2 if policy == "mixed_float16" else 5e-2
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), expected, atol=tolerance)
    mean, var = whole_batch_statistics(x)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    # The spread of the ghost means is taken from float32 means rounded at
    # 1e5 (ulp 0.008): about 1e-3 of a variance of 9 here (plain BN: 1e-6).
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=3e-3)


# -- degenerate batches ---------------------------------------------------------------------


@MODES
@pytest.mark.parametrize("static", [True, False], ids=["static", "unknown_batch"])
def test_empty_and_tiny_batches_never_give_nan(rng, jit_compile, static):
    layer = randomized(kerasbn.BatchNorm(momentum=0.5, virtual_batch_size=4, jit_compile=jit_compile), (None, 3), rng)
    spec = tf.TensorSpec((None, 3) if not static else None, tf.float32)
    step = tf.function(lambda x: layer(x, training=True), input_signature=None if static else [spec])
    beta = layer.beta.numpy()
    # An empty batch: an empty output, the moving statistics left alone.
    assert step(tf.zeros((0, 3))).shape == (0, 3)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)
    # 5 examples of rank 2: ghost batches of 4 and 1; the single example has
    # zero variance and outputs beta, as in plain BN.
    x = rng.normal(size=(5, 3)).astype("float32")
    y = step(tf.constant(x)).numpy()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[4], beta, atol=1e-6)
    expected, _ = ghost_reference(x, 4, -1, layer.gamma.numpy(), beta)
    np.testing.assert_allclose(y, expected, atol=2e-5)


def test_fully_masked_batch_outputs_beta_and_keeps_the_moving_statistics(rng):
    layer = randomized(kerasbn.BatchNorm(virtual_batch_size=2), (5, 4, 3), rng)
    y = train_call(layer, rng.normal(size=(5, 4, 3)).astype("float32"), np.zeros((5, 4), bool))
    np.testing.assert_allclose(y, np.broadcast_to(layer.beta.numpy(), y.shape), atol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), 0.0)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), 1.0)


def test_batch_smaller_than_v_equals_plain_batch_norm(rng):
    x = rng.normal(1.0, 2.0, (6, 5, 3)).astype("float32")
    ghost, plain = kerasbn.BatchNorm(virtual_batch_size=16), kerasbn.BatchNorm()
    np.testing.assert_allclose(train_call(ghost, x), train_call(plain, x), atol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-6)


# -- inference, serving, saving, configuration ----------------------------------------------


def test_inference_is_plain_batch_norm_on_any_batch_size(rng):
    ghost, plain = kerasbn.BatchNorm(virtual_batch_size=4), kerasbn.BatchNorm()
    ghost.build((None, 3))
    plain.build((None, 3))
    ghost.set_weights([rng.normal(size=3), rng.normal(size=3), rng.normal(size=3), rng.uniform(0.5, 2, 3)])
    plain.set_weights(ghost.get_weights())
    for batch in (1, 3, 7):
        x = tf.constant(rng.normal(size=(batch, 3)).astype("float32"))
        np.testing.assert_array_equal(ghost(x).numpy(), plain(x).numpy())


def test_export_for_serving_folds_it_like_any_batch_norm(rng, tmp_path):
    inputs = keras.Input((6, 6, 2), name="image")
    h = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    h = kerasbn.BatchNorm(virtual_batch_size=4, name="ghost_bn")(h)
    model = keras.Model(inputs, keras.layers.Flatten(name="flat")(h))
    model(rng.normal(size=(10, 6, 6, 2)).astype("float32"), training=True)  # moving statistics moved
    path = kerasbn.export_for_serving(model, tmp_path / "1")
    meta = saved_model_utils.get_meta_graph_def(path, "serve")
    variables = [n.variable.name for n in meta.object_graph_def.nodes if n.HasField("variable")]
    assert variables and not [name for name in variables if "moving" in name or "gamma" in name]
    served = tf.saved_model.load(path).signatures["serving_default"]
    for batch in (1, 3, 7):
        x = rng.normal(size=(batch, 6, 6, 2)).astype("float32")
        np.testing.assert_allclose(served(image=tf.constant(x))["flat"].numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_build_leaves_the_config_alone():
    layer = kerasbn.BatchRenorm(axis=[1, 2], virtual_batch_size=np.int64(8), moving_statistics="ghost_mean")
    config = layer.get_config()
    assert config["virtual_batch_size"] == 8 and type(config["virtual_batch_size"]) is int
    assert config["moving_statistics"] == "ghost_mean" and config["axis"] == [1, 2]
    layer.build((None, 3, 4, 5))
    layer(tf.zeros((8, 3, 4, 5)), training=True)
    assert layer.get_config() == config  # tf_keras' build shifted `axis` (keras #16713)
    assert kerasbn.BatchRenorm.from_config(config).get_config() == config
    assert kerasbn.BatchNorm().get_config()["virtual_batch_size"] is None


@pytest.mark.parametrize("value", [0, -4, 2.0, 2.5, True, "16", [4]])
def test_bad_virtual_batch_size_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="virtual_batch_size"):
        kerasbn.BatchNorm(virtual_batch_size=value)


@pytest.mark.parametrize("value", ["exact", "Batch", None, 1])
def test_bad_moving_statistics_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="moving_statistics"):
        kerasbn.BatchRenorm(virtual_batch_size=4, moving_statistics=value)


@pytest.mark.parametrize("axis", [0, -3, [0, 2]])
def test_ghost_batches_cannot_be_cut_along_a_feature_axis(axis):
    # Ghost batches are slices of axis 0: it can never be a feature axis.
    with pytest.raises(ValueError, match="batch axis 0"):
        kerasbn.BatchNorm(axis=axis, virtual_batch_size=4).build((None, 3, 4))


def test_keras_file_loads_in_a_fresh_process(rng, tmp_path):
    inputs = keras.Input((5, 3))
    outputs = kerasbn.BatchRenorm(virtual_batch_size=4, moving_statistics="ghost_mean", name="ghost")(inputs)
    model = keras.Model(inputs, outputs)
    x = rng.normal(2.0, 1.0, (6, 5, 3)).astype("float32")
    model(x, training=True)
    path = tmp_path / "ghost.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    expected = {"inference": model(x).numpy(), "training": model(x, training=True).numpy()}
    script = textwrap.dedent(
        f"""
        import json, numpy as np, keras, kerasbn
        model = keras.models.load_model({str(path)!r})
        layer = model.get_layer("ghost")
        x = np.load({str(tmp_path / "x.npy")!r})
        np.save({str(tmp_path / "inference.npy")!r}, model(x).numpy())
        np.save({str(tmp_path / "training.npy")!r}, model(x, training=True).numpy())
        print(json.dumps({{k: layer.get_config()[k] for k in ("virtual_batch_size", "moving_statistics", "axis")}}))
        """
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == '{"virtual_batch_size": 4, "moving_statistics": "ghost_mean", "axis": -1}'
    for name, value in expected.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), value, atol=1e-5)
