"""Ragged, sparse, string and integer inputs, against Keras' layers and float64 formulas.

Keras' `BatchNormalization` takes a `tf.RaggedTensor` and normalizes it with
statistics over its flat values; `GroupNormalization` rejects it. Our layers
must give Keras' outputs and moving statistics wherever Keras' layer works,
respect ragged masks (Keras' layer fails on them in training), and refuse
what has no meaning with a `TypeError` naming the layer and the argument.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from references import batch_norm_formula, inference_reference, moving_average_formula

import kerasbn
from platform_support import requires_keras_renorm

EPSILON = 1e-3
# float32 against float32 Keras, or against float64 formulas, on values of order 1-10.
ATOL = 2e-5


def ragged_input(rng, row_lengths, inner, ragged_rank=1, scale=3.0, shift=1.0):
    """A float32 ragged tensor: `row_lengths` nested (one list per ragged axis), `inner` dense axes."""
    nested = [np.asarray(lengths, np.int64) for lengths in row_lengths]
    assert len(nested) == ragged_rank
    values = rng.normal(shift, scale, size=(int(nested[-1].sum()), *inner)).astype(np.float32)
    return tf.RaggedTensor.from_nested_row_lengths(values, nested)


def random_state(rng, layer):
    """Random gamma, beta and positive statistics for every weight of a built layer."""
    weights = []
    for weight in layer.get_weights():
        if "int" in str(weight.dtype):
            weights.append(weight)
        else:
            weights.append(rng.uniform(0.5, 1.5, weight.shape).astype(weight.dtype))
    return weights


def keras_and_ours(rng, ours, theirs, sample):
    """Builds both layers on `sample` and gives them the same random weights."""
    theirs(sample)
    ours(sample)
    state = random_state(rng, theirs)
    theirs.set_weights(state)
    ours.set_weights(state)


def assert_weights_close(ours, theirs, atol=ATOL):
    for mine, reference in zip(ours.weights, theirs.weights):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=atol, rtol=1e-5, err_msg=mine.path)


def assert_ragged_close(ours, reference, atol=ATOL):
    assert isinstance(ours, tf.RaggedTensor), type(ours)
    for mine, theirs in zip(ours.nested_row_splits, reference.nested_row_splits):
        np.testing.assert_array_equal(mine.numpy(), theirs.numpy())
    np.testing.assert_allclose(ours.flat_values.numpy(), reference.flat_values.numpy(), atol=atol, rtol=1e-5)


# -- BatchNorm and BatchRenorm on ragged inputs, against Keras ---------------


@pytest.mark.parametrize(
    "row_lengths, inner, axis",
    [
        ([[3, 0, 5, 2]], (4,), -1),  # (batch, None, C): an empty row included
        ([[2, 4, 1]], (3, 4), -1),  # (batch, None, H, C)
        ([[2, 4, 1]], (3, 4), 2),  # feature axis H, positive index
        ([[2, 4, 1]], (3, 4), -2),
        ([[2, 1], [3, 0, 4]], (3,), -1),  # ragged_rank 2: (batch, None, None, C)
    ],
)
def test_batch_norm_ragged_matches_keras(rng, row_lengths, inner, axis):
    x = ragged_input(rng, row_lengths, inner, ragged_rank=len(row_lengths))
    ours, theirs = kerasbn.BatchNorm(axis=axis), keras.layers.BatchNormalization(axis=axis)
    keras_and_ours(rng, ours, theirs, x)
    for step in range(2):
        batch = x * (step + 1.0)
        assert_ragged_close(ours(batch, training=True), theirs(batch, training=True))
        assert_weights_close(ours, theirs)
    assert_ragged_close(ours(x, training=False), theirs(x, training=False))
    assert_ragged_close(ours(x), theirs(x))


def test_batch_norm_ragged_two_feature_axes_against_float64_formula(rng):
    """Keras' layer takes one axis; axis=[2, 3] of (batch, None, H, C) is [0, 1] of the flat values."""
    x = ragged_input(rng, [[2, 4, 1]], (3, 4))
    layer = kerasbn.BatchNorm(axis=[2, 3], momentum=0.9)
    layer(x)
    layer.set_weights(random_state(rng, layer))
    before = layer.moving_mean.numpy().astype(np.float64)
    y = layer(x, training=True)
    flat = tf.cast(x.flat_values, tf.float64)
    gamma, beta = (tf.cast(w, tf.float64) for w in (layer.gamma, layer.beta))
    reference, mean, _, count = batch_norm_formula(flat, gamma, beta, EPSILON, [1, 2])
    np.testing.assert_allclose(y.flat_values.numpy(), reference.numpy(), atol=ATOL)
    expected_mean = moving_average_formula(before, mean, 0.9, count).numpy()
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, atol=ATOL)


@given(
    lengths=st.lists(st.integers(0, 5), min_size=1, max_size=6).filter(lambda v: sum(v) > 0),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=12, deadline=None)
def test_batch_norm_ragged_property(lengths, channels, seed):
    rng = np.random.default_rng(seed)
    x = ragged_input(rng, [lengths], (channels,))
    ours, theirs = kerasbn.BatchNorm(), keras.layers.BatchNormalization()
    keras_and_ours(rng, ours, theirs, x)
    assert_ragged_close(ours(x, training=True), theirs(x, training=True))
    assert_weights_close(ours, theirs)
    assert_ragged_close(ours(x), theirs(x))


@requires_keras_renorm
@pytest.mark.parametrize("row_lengths, inner", [([[3, 1, 4, 2]], (3,)), ([[2, 1], [3, 1, 2]], (2, 3))])
def test_batch_renorm_ragged_matches_keras_renorm(rng, row_lengths, inner):
    x = ragged_input(rng, row_lengths, inner, ragged_rank=len(row_lengths))
    ours = kerasbn.BatchRenorm(r_max=1.5, d_max=0.5, renorm_momentum=0.9, momentum=0.8)
    theirs = keras.layers.BatchNormalization(
        renorm=True,
        renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5},
        renorm_momentum=0.9,
        momentum=0.8,
    )
    keras_and_ours(rng, ours, theirs, x)
    for step in range(3):
        # Shifted and scaled batches so that r and d are clipped.
        batch = x * (1.0 + step) + 2.0 * step
        assert_ragged_close(ours(batch, training=True), theirs(batch, training=True))
        assert_weights_close(ours, theirs)
    assert_ragged_close(ours(x, training=False), theirs(x, training=False))


# -- masks ---------------------------------------------------------------------


def ragged_mask(rng, x, feature_axes_count=1):
    """A random boolean ragged mask with x's partitions and shape without its last axes."""
    shape = x.flat_values.shape[: x.flat_values.shape.rank - feature_axes_count]
    flags = rng.random(tuple(shape)) < 0.6
    flags.flat[0] = True
    return x.with_flat_values(tf.constant(flags))


@pytest.mark.parametrize("layer_class", [kerasbn.BatchNorm, kerasbn.BatchRenorm])
@pytest.mark.parametrize("row_lengths, inner", [([[3, 0, 5, 2]], (4,)), ([[2, 1], [3, 1, 2]], (2, 3))])
def test_ragged_mask_against_float64_formula(rng, layer_class, row_lengths, inner):
    x = ragged_input(rng, row_lengths, inner, ragged_rank=len(row_lengths))
    mask = ragged_mask(rng, x)
    # NaN at masked positions must not reach the statistics.
    values = np.where(mask.flat_values.numpy()[..., None], x.flat_values.numpy(), np.nan)
    x = x.with_flat_values(tf.constant(values.astype(np.float32)))
    layer = layer_class(momentum=0.9)
    layer(x)
    layer.set_weights(random_state(rng, layer))
    before = {w.name: w.numpy().astype(np.float64) for w in layer.weights}
    renorm = None
    if layer_class is kerasbn.BatchRenorm:
        renorm = dict(
            renorm_mean=before["renorm_mean"], renorm_stddev=before["renorm_stddev"], r_max=3.0, d_max=5.0
        )
    y = layer(x, training=True, mask=mask)
    flat = tf.constant(values, tf.float64)
    reference, mean, variance, count = batch_norm_formula(
        flat, before["gamma"], before["beta"], EPSILON, -1, mask=mask.flat_values, renorm=renorm
    )
    kept = mask.flat_values.numpy()
    np.testing.assert_allclose(y.flat_values.numpy()[kept], reference.numpy()[kept], atol=ATOL)
    assert np.isnan(y.flat_values.numpy()[~kept]).all()
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), moving_average_formula(before["moving_mean"], mean, 0.9, count), atol=ATOL
    )
    if renorm is None:
        expected_variance = moving_average_formula(before["moving_variance"], variance, 0.9, count)
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected_variance, atol=ATOL)
    else:
        stddev = moving_average_formula(before["moving_stddev"], np.sqrt(variance + EPSILON), 0.9, count)
        np.testing.assert_allclose(layer.moving_stddev.numpy(), stddev, atol=ATOL)
    # Inference: the moving statistics, at every position, masked or not.
    y = layer(x, training=False, mask=mask)
    expected = inference_reference(
        values, layer.gamma.numpy(), layer.beta.numpy(), layer.moving_mean.numpy(),
        layer.moving_variance.numpy(), EPSILON, -1,
    )
    np.testing.assert_allclose(y.flat_values.numpy(), expected, atol=ATOL)


def test_mask_from_embedding_in_a_model(rng):
    """Embedding(mask_zero=True) on ragged ids gives a ragged mask; padding ids 0 are left out."""
    ids = tf.ragged.constant([[3, 1, 0], [2], [0, 4, 4, 1]])
    embedding = keras.layers.Embedding(5, 3, mask_zero=True)
    layer = kerasbn.BatchNorm(momentum=0.0)
    y = layer(embedding(ids), training=True)
    vectors = embedding(ids).flat_values.numpy().astype(np.float64)
    kept = ids.flat_values.numpy() != 0
    np.testing.assert_allclose(layer.moving_mean.numpy(), vectors[kept].mean(0), atol=ATOL)
    np.testing.assert_allclose(layer.moving_variance.numpy(), vectors[kept].var(0), atol=ATOL)
    expected = (vectors - vectors[kept].mean(0)) / np.sqrt(vectors[kept].var(0) + EPSILON)
    np.testing.assert_allclose(y.flat_values.numpy(), expected, atol=1e-4)


def test_mask_must_be_ragged_with_the_same_rows(rng):
    x = ragged_input(rng, [[2, 3]], (2,))
    layer = kerasbn.BatchNorm()
    with pytest.raises(TypeError, match=r"BatchNorm.*`mask`.*EagerTensor"):
        layer(x, training=True, mask=tf.ones((2, 3), tf.bool))
    other_rows = tf.RaggedTensor.from_row_lengths(tf.ones(5, tf.bool), [3, 2])
    with pytest.raises(ValueError, match=r"`mask` must have the same row lengths"):
        layer(x, training=True, mask=other_rows)

    @tf.function
    def step(x, mask):
        return layer(x, training=True, mask=mask)

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`mask` must have the same row lengths"):
        step(x, other_rows)


# -- ghost batches: examples are the ragged rows --------------------------------


def test_ghost_batches_of_ragged_rows(rng):
    lengths = [3, 1, 0, 4, 2]
    x = ragged_input(rng, [lengths], (3,))
    layer = kerasbn.BatchNorm(virtual_batch_size=2, momentum=0.5)
    layer(x)
    gamma, beta = rng.uniform(0.5, 1.5, (2, 3))
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y = layer(x, training=True)
    splits = x.row_splits.numpy()
    flat = x.flat_values.numpy().astype(np.float64)
    for start in range(0, len(lengths), 2):
        rows = slice(splits[start], splits[min(start + 2, len(lengths))])
        if rows.stop == rows.start:
            continue
        ghost = flat[rows]
        expected = gamma * (ghost - ghost.mean(0)) / np.sqrt(ghost.var(0) + EPSILON) + beta
        np.testing.assert_allclose(y.flat_values.numpy()[rows], expected, atol=ATOL)
    # moving_statistics="batch": the whole batch's statistics.
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * flat.mean(0), atol=ATOL)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * flat.var(0), atol=ATOL)


def test_empty_ragged_batch_keeps_the_moving_statistics(rng):
    """As for an empty dense batch (docs/batch-norm.md); Keras' layer turns them into NaN."""
    x = tf.RaggedTensor.from_row_lengths(tf.zeros((0, 3)), [0, 0])
    layer = kerasbn.BatchRenorm()
    layer(x)
    state = random_state(rng, layer)
    layer.set_weights(state)
    y = layer(x, training=True)
    assert isinstance(y, tf.RaggedTensor) and y.flat_values.shape == (0, 3)
    np.testing.assert_array_equal(y.row_lengths().numpy(), [0, 0])
    for weight, before in zip(layer.weights[:-1], state[:-1]):
        np.testing.assert_array_equal(weight.numpy(), before, err_msg=weight.path)


# -- gradients and models ---------------------------------------------------------


def test_ragged_gradients_match_keras(rng):
    x = ragged_input(rng, [[2, 4, 1, 3]], (3,))
    ours, theirs = kerasbn.BatchNorm(activation="relu"), keras.layers.BatchNormalization()
    keras_and_ours(rng, ours, theirs, x)
    weights = tf.constant(rng.normal(size=x.flat_values.shape), tf.float32)

    def gradients(layer, activation):
        values = tf.Variable(x.flat_values)
        with tf.GradientTape() as tape:
            y = activation(layer(x.with_flat_values(values), training=True).flat_values)
            loss = tf.reduce_sum(y * weights)
        return tape.gradient(loss, [values, *layer.trainable_weights])

    for mine, reference in zip(gradients(ours, tf.identity), gradients(theirs, tf.nn.relu)):
        np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=1e-4)


class RowMean(keras.layers.Layer):
    """The mean of each sample's rows: (batch, None, C) ragged to (batch, C) dense."""

    def call(self, inputs):
        return tf.reduce_mean(inputs, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def ragged_model(normalization, seed):
    inputs = keras.Input(shape=(None, 3), ragged=True)
    hidden = normalization(inputs)
    outputs = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed))(
        RowMean()(hidden)
    )
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: kerasbn.BatchNorm(momentum=0.8), lambda: keras.layers.BatchNormalization(momentum=0.8)),
        pytest.param(
            lambda: kerasbn.BatchRenorm(r_max=1.5, d_max=0.5, momentum=0.8),
            lambda: keras.layers.BatchNormalization(
                momentum=0.8, renorm=True, renorm_clipping={"rmax": 1.5, "rmin": 1 / 1.5, "dmax": 0.5}
            ),
            marks=requires_keras_renorm,
        ),
    ],
    ids=["BatchNorm", "BatchRenorm"],
)
def test_fit_on_a_ragged_input_matches_keras(rng, ours, theirs):
    lengths = rng.integers(1, 6, size=16)
    x = ragged_input(rng, [lengths], (3,))
    y = rng.normal(size=(16, 1)).astype(np.float32)
    our_model, keras_model = ragged_model(ours(), 7), ragged_model(theirs(), 7)
    assert our_model.layers[1].output.ragged  # the symbolic output is ragged, as the real one
    history = {}
    for name, model in (("ours", our_model), ("keras", keras_model)):
        history[name] = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0).history["loss"]
    np.testing.assert_allclose(history["ours"], history["keras"], rtol=1e-4)
    assert_weights_close(our_model.layers[1], keras_model.layers[1], atol=1e-4)
    np.testing.assert_allclose(
        our_model.predict(x, verbose=0), keras_model.predict(x, verbose=0), atol=1e-4
    )


# -- refused inputs ------------------------------------------------------------------

LAYERS = {
    "BatchNorm": lambda: kerasbn.BatchNorm(),
    "BatchRenorm": lambda: kerasbn.BatchRenorm(),
    "GroupNorm": lambda: kerasbn.GroupNorm(groups=2),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_sparse_inputs_are_refused(name, training):
    sparse = tf.sparse.from_dense(tf.constant([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]))
    with pytest.raises(TypeError, match=rf"{name} does not accept sparse.*inputs of type SparseTensor"):
        LAYERS[name]()(sparse, training=training)
    with pytest.raises(TypeError, match=rf"{name} does not accept sparse.*KerasTensor"):
        LAYERS[name]()(keras.Input((2,), sparse=True))


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("training", [True, False])
def test_string_and_complex_inputs_are_refused(name, training):
    cases = [
        tf.constant([["a", "b"], ["c", "d"]]),
        np.array([["a", "b"], ["c", "d"]]),
        tf.ragged.constant([[["a", "b"]], [["c", "d"], ["e", "f"]]], ragged_rank=1),
        tf.complex(tf.ones((2, 2)), tf.ones((2, 2))),
    ]
    for inputs in cases:
        with pytest.raises(TypeError, match=rf"{name} needs real-valued inputs.*dtype=(string|complex64)"):
            LAYERS[name]()(inputs, training=training)
    with pytest.raises(TypeError, match=rf"{name} needs real-valued inputs.*dtype=string"):
        LAYERS[name]()(keras.Input((2,), dtype="string"))


@pytest.mark.parametrize("training", [True, False])
def test_group_norm_refuses_ragged_as_keras_does(rng, training):
    x = ragged_input(rng, [[2, 3]], (4,))
    with pytest.raises((ValueError, TypeError)):
        keras.layers.GroupNormalization(groups=2)(x, training=training)
    with pytest.raises(TypeError, match=r"GroupNorm does not accept ragged.*inputs of type RaggedTensor"):
        kerasbn.GroupNorm(groups=2)(x, training=training)
    with pytest.raises(TypeError, match=r"GroupNorm does not accept ragged.*KerasTensor"):
        kerasbn.GroupNorm(groups=2)(keras.Input((None, 4), ragged=True))


@pytest.mark.parametrize("layer_class", [kerasbn.BatchNorm, kerasbn.BatchRenorm])
def test_feature_axis_along_a_ragged_dimension_is_refused(rng, layer_class):
    x = ragged_input(rng, [[2, 4, 1]], (3, 4))
    with pytest.raises(TypeError, match=rf"{layer_class.__name__} cannot take a feature axis.*axis=1"):
        layer_class(axis=1)(x, training=True)
    # Rows of equal length are still a ragged partition, not features.
    uniform = tf.RaggedTensor.from_uniform_row_length(tf.ones((6, 2)), 3)
    with pytest.raises(TypeError, match=r"cannot take a feature axis.*axis=\[1, 2\]"):
        layer_class(axis=[1, 2])(uniform)


# -- integer and boolean inputs are cast, as Keras does ------------------------------


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_integer_inputs_batch_norm_matches_keras(rng, dtype, ragged):
    values = rng.integers(0, 2 if dtype == "bool" else 9, size=(7, 3))
    x = tf.cast(tf.constant(values), dtype)
    if ragged:
        x = tf.RaggedTensor.from_row_lengths(x, [3, 0, 4])
    ours, theirs = kerasbn.BatchNorm(), keras.layers.BatchNormalization()
    keras_and_ours(rng, ours, theirs, x)
    for training in (True, False):
        mine, reference = ours(x, training=training), theirs(x, training=training)
        if ragged:
            assert_ragged_close(mine, reference)
        else:
            np.testing.assert_allclose(mine.numpy(), reference.numpy(), atol=ATOL)
        assert mine.dtype == tf.float32
    assert_weights_close(ours, theirs)


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_integer_inputs_group_norm_matches_keras_on_the_float_values(rng, dtype):
    """Keras' GroupNormalization rounds its output to the input's integer dtype (mostly
    to 0): the reference is its output for the same values as float32."""
    x = tf.cast(tf.constant(rng.integers(0, 2 if dtype == "bool" else 9, size=(3, 5, 4))), dtype)
    ours, theirs = kerasbn.GroupNorm(groups=2), keras.layers.GroupNormalization(groups=2)
    keras_and_ours(rng, ours, theirs, tf.cast(x, tf.float32))
    expected = theirs(tf.cast(x, tf.float32)).numpy()
    for training in (True, False):
        np.testing.assert_allclose(ours(x, training=training).numpy(), expected, atol=ATOL)
