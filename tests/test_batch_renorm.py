"""kerasbn.BatchRenorm against Keras' renorm layer, float64 formulas and finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from platform_support import keras_batch_renorm
from references import central_differences, feature_axes_of


def keras_renorm(r_max, d_max, renorm_momentum=0.99, **kwargs):
    return keras_batch_renorm(
        renorm_clipping={"rmax": r_max, "rmin": 1.0 / r_max, "dmax": d_max},
        renorm_momentum=renorm_momentum,
        **kwargs,
    )


def renorm_formula(x, gamma, beta, renorm_mean, renorm_stddev, r_max, d_max, epsilon, axis):
    """Ioffe's training output written with plain TF ops (float64), for autodiff."""
    rank = x.shape.rank
    features = feature_axes_of(axis, rank)
    axes = [a for a in range(rank) if a not in features]
    shape = [x.shape[a] if a in features else 1 for a in range(rank)]
    mean, variance = tf.nn.moments(x, axes, keepdims=True)
    stddev = tf.sqrt(variance + epsilon)
    reference = tf.reshape(tf.maximum(renorm_stddev, np.sqrt(epsilon)), shape)
    r = tf.stop_gradient(tf.clip_by_value(stddev / reference, 1 / r_max, r_max))
    d = tf.stop_gradient(
        tf.clip_by_value((mean - tf.reshape(renorm_mean, shape)) / reference, -d_max, d_max)
    )
    x_hat = (x - mean) / stddev * r + d
    return tf.reshape(gamma, shape) * x_hat + tf.reshape(beta, shape)


@pytest.mark.parametrize(
    "shape,axis", [((16, 3), -1), ((6, 5, 4), -1), ((4, 5, 5, 3), -1), ((4, 3, 5, 5), 1), ((2, 3, 4, 4, 2), -1)]
)
@pytest.mark.parametrize("jit_compile", [True, False])
def test_matches_keras_renorm_step_for_step(rng, shape, axis, jit_compile):
    # Small limits so that the clipping is active in some steps and not in others.
    ours = kerasbn.BatchRenorm(
        axis=axis, r_max=1.5, d_max=0.5, renorm_momentum=0.9, momentum=0.8, jit_compile=jit_compile
    )
    theirs = keras_renorm(1.5, 0.5, renorm_momentum=0.9, axis=axis, momentum=0.8)
    ours.build(shape)
    theirs.build(shape)
    channels = shape[axis]
    theirs.gamma.assign(rng.normal(1.0, 0.3, channels))
    theirs.beta.assign(rng.normal(0.0, 0.3, channels))
    ours.set_weights(theirs.get_weights())
    for step in range(6):
        x = rng.normal(0.3 * step, 1.0 + 0.4 * step, shape).astype("float32")
        np.testing.assert_allclose(
            ours(x, training=True).numpy(), theirs(x, training=True).numpy(), rtol=1e-5, atol=2e-5
        )
    for mine, keras_weight in zip(ours.weights, theirs.weights):
        assert mine.name == keras_weight.name
        np.testing.assert_allclose(mine.numpy(), keras_weight.numpy(), rtol=2e-5, atol=1e-6)
    assert int(ours.step.numpy()) == 6
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=2e-5)


def test_weights_follow_keras_renorm_order_plus_step():
    ours = kerasbn.BatchRenorm()
    theirs = keras_renorm(3.0, 5.0)
    ours.build((None, 4))
    theirs.build((None, 4))
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights] + ["step"]
    assert [w.name for w in ours.trainable_weights] == ["gamma", "beta"]
    np.testing.assert_allclose(ours.moving_stddev.numpy(), np.ones(4))


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_gradient_matches_autodiff_of_the_formula(rng, mode):
    shape, axis, epsilon = (6, 4, 3), -1, 1e-3
    x = tf.constant(rng.normal(1.0, 2.0, shape))
    weight = tf.constant(rng.normal(size=shape))
    layer = kerasbn.BatchRenorm(r_max=1.3, d_max=0.4, dtype="float64")
    layer.build(shape)
    layer.gamma.assign(rng.normal(1.0, 0.3, 3))
    layer.beta.assign(rng.normal(0.0, 0.3, 3))
    layer.renorm_mean.assign([0.5, 1.0, 3.0])  # d clipped for some channels only
    layer.renorm_stddev.assign([2.0, 0.5, 2.2])  # r clipped for some channels only
    state = [v.numpy() for v in (layer.gamma, layer.beta, layer.renorm_mean, layer.renorm_stddev)]

    def ours():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 2 * weight)
        return tape.gradient(loss, [x, layer.gamma, layer.beta])

    gamma = tf.constant(state[0])
    beta = tf.constant(state[1])
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y = renorm_formula(x, gamma, beta, state[2], state[3], 1.3, 0.4, epsilon, axis)
        loss = tf.reduce_sum(y**2 * weight)
    expected = tape.gradient(loss, [x, gamma, beta])
    got = ours() if mode == "eager" else tf.function(ours, jit_compile=True)()
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-10)


def test_gradient_matches_finite_differences_where_r_and_d_are_clipped(rng):
    # With r and d saturated at their limits they are locally constant, so the
    # true derivative of the layer's output equals the custom gradient.
    shape = (5, 3, 2)
    x0 = rng.normal(0.0, 3.0, shape)
    weight = rng.normal(size=shape)

    def make_layer():
        layer = kerasbn.BatchRenorm(r_max=1.2, d_max=0.3, dtype="float64", jit_compile=False)
        layer.build(shape)
        layer.gamma.assign([1.3, 0.7])
        layer.beta.assign([0.1, -0.2])
        layer.renorm_stddev.assign([0.2, 0.2])  # sigma_B / sigma >> r_max
        layer.renorm_mean.assign([10.0, -10.0])  # |d| >> d_max
        return layer

    def loss(x):
        return float(tf.reduce_sum(make_layer()(tf.constant(x), training=True) ** 2 * weight))

    layer = make_layer()
    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        value = tf.reduce_sum(layer(xt, training=True) ** 2 * weight)
    analytic = tape.gradient(value, xt).numpy()
    np.testing.assert_allclose(analytic, central_differences(loss, x0), rtol=1e-5, atol=1e-6)


def test_r_and_d_carry_no_gradient_to_the_renorm_statistics(rng):
    layer = kerasbn.BatchRenorm(r_max=2.0, d_max=2.0)
    x = tf.constant(rng.normal(size=(8, 3)).astype("float32"))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        tape.watch([layer.renorm_mean.value, layer.renorm_stddev.value])
        y = layer(x, training=True)
    for gradient in tape.gradient(y, [layer.renorm_mean, layer.renorm_stddev]):
        # None eagerly; a compiled tf.function reports unconnected inputs as zeros.
        assert gradient is None or not np.any(gradient.numpy())


def test_with_limits_one_and_zero_it_is_batch_norm(rng):
    renorm = kerasbn.BatchRenorm(r_max=1.0, d_max=0.0, momentum=0.5)
    plain = kerasbn.BatchNorm(momentum=0.5)
    for _ in range(3):
        x = rng.normal(4.0, 3.0, (8, 5)).astype("float32")
        np.testing.assert_allclose(
            renorm(x, training=True).numpy(), plain(x, training=True).numpy(), rtol=1e-5, atol=1e-5
        )
    np.testing.assert_allclose(renorm.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-6)


def test_linear_ramp_values():
    ramp = kerasbn.LinearRamp(1.0, 3.0, start_step=10, end_step=30)
    values = [float(ramp(step)) for step in (0, 10, 20, 30, 1000)]
    np.testing.assert_allclose(values, [1.0, 1.0, 2.0, 3.0, 3.0])
    jump = kerasbn.LinearRamp(0.0, 5.0, start_step=4, end_step=4)
    assert [float(jump(s)) for s in (3, 4)] == [0.0, 5.0]


def test_paper_schedule_has_the_papers_numbers():
    clipping = kerasbn.paper_renorm_clipping()
    r_max, d_max = clipping["r_max"], clipping["d_max"]
    for step, want_r, want_d in [(0, 1, 0), (5000, 1, 0), (25000, 1 + 2 * 20 / 35, 5), (40000, 3, 5)]:
        np.testing.assert_allclose(float(r_max(step)), want_r, rtol=1e-6)
        np.testing.assert_allclose(float(d_max(step)), want_d, rtol=1e-6)


def test_schedule_follows_the_layers_own_training_step_counter(rng):
    layer = kerasbn.BatchRenorm(
        r_max=kerasbn.LinearRamp(1.0, 2.0, 2, 4), d_max=kerasbn.LinearRamp(0.0, 1.0, 2, 4)
    )
    x = rng.normal(size=(8, 2)).astype("float32")
    layer(x)  # inference calls do not count
    layer(x, training=False)
    seen = []
    for _ in range(6):
        seen.append([float(v) for v in layer.current_limits()])
        layer(x, training=True)
    assert int(layer.step.numpy()) == 6
    np.testing.assert_allclose(seen, [[1, 0], [1, 0], [1, 0], [1.5, 0.5], [2, 1], [2, 1]])
    layer.trainable = False
    layer(x, training=True)
    assert int(layer.step.numpy()) == 6


def test_schedule_matches_keras_renorm_with_the_scheduled_limits(rng):
    schedule = kerasbn.LinearRamp(1.1, 1.6, 0, 3)
    ours = kerasbn.BatchRenorm(r_max=schedule, d_max=0.2)
    ours.build((None, 3))
    for step in range(4):
        limit = float(schedule(step))
        theirs = keras_renorm(limit, 0.2)
        theirs.build((None, 3))
        theirs.set_weights(ours.get_weights()[:-1])
        x = rng.normal(1.0, 3.0, (6, 3)).astype("float32")
        np.testing.assert_allclose(
            ours(x, training=True).numpy(), theirs(x, training=True).numpy(), rtol=1e-5, atol=1e-5
        )


def test_any_learning_rate_schedule_or_callable_is_accepted(rng):
    decay = keras.optimizers.schedules.PolynomialDecay(3.0, 10, end_learning_rate=1.0)
    layer = kerasbn.BatchRenorm(r_max=decay, d_max=lambda step: 0.0)
    layer(rng.normal(size=(4, 2)).astype("float32"), training=True)
    np.testing.assert_allclose([float(v) for v in layer.current_limits()], [2.8, 0.0], rtol=1e-6)


def test_schedule_and_step_survive_a_keras_file(tmp_path, rng):
    inputs = keras.Input((3,))
    outputs = kerasbn.BatchRenorm(**kerasbn.paper_renorm_clipping(warmup_steps=2, r_max_step=8, d_max_step=6))(inputs)
    model = keras.Model(inputs, outputs)
    layer = model.layers[-1]
    for _ in range(5):
        layer(rng.normal(size=(4, 3)).astype("float32"), training=True)
    path = tmp_path / "renorm.keras"
    model.save(path)
    loaded = keras.models.load_model(path).layers[-1]
    assert isinstance(loaded.r_max, kerasbn.LinearRamp)
    assert loaded.r_max.get_config() == layer.r_max.get_config()
    assert int(loaded.step.numpy()) == 5
    np.testing.assert_allclose(
        [float(v) for v in loaded.current_limits()], [float(v) for v in layer.current_limits()]
    )


def test_keras_weights_migrate_with_set_weights(rng):
    theirs = keras_renorm(3.0, 5.0)
    x = rng.normal(2.0, 2.0, (16, 4)).astype("float32")
    for _ in range(3):
        theirs(x, training=True)
    ours = kerasbn.BatchRenorm()
    ours.build((None, 4))
    ours.set_weights(theirs.get_weights())
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=1e-5, atol=1e-6)


def test_empty_feature_keeps_statistics_and_gives_beta(rng):
    layer = kerasbn.BatchRenorm(beta_initializer="ones")
    x = rng.normal(size=(4, 5, 2)).astype("float32")
    mask = np.zeros((4, 5), bool)
    layer.build(x.shape)
    before = [w.numpy().copy() for w in layer.non_trainable_weights[:-1]]
    y = layer(x, training=True, mask=mask).numpy()
    np.testing.assert_array_equal(y, np.ones_like(y))
    for old, weight in zip(before, layer.non_trainable_weights[:-1]):
        np.testing.assert_array_equal(old, weight.numpy())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"r_max": 0.5}, "r_max"),
        ({"d_max": -1.0}, "d_max"),
        ({"r_max": float("nan")}, "r_max"),
        ({"d_max": float("nan")}, "d_max"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"renorm_momentum": 1.0}, "renorm_momentum"),
        ({"momentum": -0.1}, "momentum"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        kerasbn.BatchRenorm(**kwargs)


def test_infinite_limits_mean_no_clipping(rng):
    # r_max = d_max = inf: x̂ = (x − μ_B)/σ_B · (σ_B/σ) + (μ_B − μ)/σ = (x − μ)/σ,
    # the renorm statistics alone, whatever the batch.
    layer = kerasbn.BatchRenorm(r_max=float("inf"), d_max=float("inf"), center=False, scale=False)
    layer.build((None, 3))
    layer.renorm_mean.assign([1.0, -2.0, 0.5])
    layer.renorm_stddev.assign([2.0, 0.5, 1.0])
    x = rng.normal(0.0, 3.0, (16, 3)).astype("float32")
    expected = (x - np.array([1.0, -2.0, 0.5])) / np.array([2.0, 0.5, 1.0])
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_ramp_rejects_end_before_start():
    with pytest.raises(ValueError, match="end_step"):
        kerasbn.LinearRamp(1.0, 3.0, start_step=10, end_step=5)
    with pytest.raises(TypeError, match="start_step"):
        kerasbn.LinearRamp(1.0, 3.0, start_step=1.5, end_step=5)
