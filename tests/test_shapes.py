"""Shapes at the edges: empty batches and batches of one, everywhere.

An empty batch reaches a layer in real training: under `MirroredStrategy` a
last global batch smaller than the number of replicas leaves some replicas
with nothing. The layers must then return the documented outputs (an empty
tensor; zero gradients; moving statistics left alone), and a batch of one
must give what the formulas give.

A row of `test_layer_on_edge_batches` picks one value of each factor:
  layer   BatchNorm, BatchRenorm, GroupNorm
  input   rank 2 (B, C); rank 3, 4, 5 channels-last (axis -1) and
          channels-first (axis 1). Spatial sizes 5, 3x6 and 2x2x3, so the
          block sums of `kernels/moments.py` see lengths under, between and
          over their blocks (8)
  mask    none, or a random one (the input's shape without the channel axis)
  kernels XLA or plain (`jit_compile=True/False` on the layer)
  mode    training or inference
  dtype   float32, or float64 (a `dtype="float64"` layer)
and is checked at batch sizes 1, 3 (a normal batch, for contrast) and 0:
forward pass, first-order gradients (the hand-derived ones training uses),
second-order gradients (a tape inside a tape) for the input and the weights,
and the moving statistics after the step.

By default the 21 rows of `covering_rows()` run (every layer with every
input, and every pair of values of any two factors in some row; about a
minute and a half on 2 cores, most of it XLA compiling for each shape).
`KERASBN_FULL_GRID=1` runs all 336 combinations instead.

References: the float64 formulas of `references.py` differentiated by
TensorFlow's autodiff (exact to any order), and Keras' own float64 layers
wherever they define the case (non-empty batches; without a mask, or with one
for channels-last BatchNormalization).
"""

import dataclasses
import itertools
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kerasbn
from kerasbn.kernels.build import Build
from kerasbn.kernels.moments import sum_over, sum_pair

BLOCK, TWO_INPUT_BLOCK = Build().block, Build().two_input_block
from platform_support import KERAS_HAS_RENORM, RENORM_SKIP_REASON
from references import (
    batch_norm_formula,
    group_norm_formula,
    inference_formula,
    moving_average_formula,
)

CHANNELS, GROUPS, EPSILON = 4, 2, 1e-3
MOMENTUM, RENORM_MOMENTUM, R_MAX, D_MAX = 0.9, 0.8, 1.5, 0.5
SPATIAL = {2: (), 3: (5,), 4: (3, 6), 5: (2, 2, 3)}
LAYOUTS = [(2, -1), (3, -1), (3, 1), (4, -1), (4, 1), (5, -1), (5, 1)]
LAYERS = ("BatchNorm", "BatchRenorm", "GroupNorm")
# In this order: a kernel traces for the first batch size and, from the second
# on, once more for any batch size (`reduce_retracing`), so the empty batch
# runs through a trace that does not know the batch size, as in `fit`.
BATCHES = (1, 3, 0)
DTYPES = ("float32", "float64")
# Against float64 references, relative to the largest value compared.
TOLERANCE = {"float32": 2e-4, "float64": 1e-6}
# Keras' masked BatchNormalization divides its sums by count + 1e-7: with one
# or two counted elements its output is off by up to 1e-4 of the largest value.
KERAS_MASKED_TOLERANCE = 2e-4


def input_shape(batch, rank, axis):
    spatial = SPATIAL[rank]
    return (batch,) + (spatial + (CHANNELS,) if axis == -1 else (CHANNELS,) + spatial)


def mask_shape(shape, axis):
    channel_axis = axis % len(shape)
    return tuple(d for a, d in enumerate(shape) if a != channel_axis)


# -- the layers and their weights ------------------------------------------------------


def our_layer(name, axis, jit_compile, dtype):
    if name == "BatchNorm":
        return kerasbn.BatchNorm(
            axis=axis, momentum=MOMENTUM, jit_compile=jit_compile, dtype=dtype
        )
    if name == "BatchRenorm":
        return kerasbn.BatchRenorm(
            axis=axis,
            momentum=MOMENTUM,
            renorm_momentum=RENORM_MOMENTUM,
            r_max=R_MAX,
            d_max=D_MAX,
            jit_compile=jit_compile,
            dtype=dtype,
        )
    return kerasbn.GroupNorm(groups=GROUPS, axis=axis, jit_compile=jit_compile, dtype=dtype)


def keras_layer(name, axis):
    if name == "BatchNorm":
        return keras.layers.BatchNormalization(axis=axis, momentum=MOMENTUM, dtype="float64")
    if name == "BatchRenorm":
        if not KERAS_HAS_RENORM:
            pytest.skip(RENORM_SKIP_REASON)
        return keras.layers.BatchNormalization(
            axis=axis,
            momentum=MOMENTUM,
            renorm=True,
            renorm_clipping={"rmax": R_MAX, "rmin": 1 / R_MAX, "dmax": D_MAX},
            renorm_momentum=RENORM_MOMENTUM,
            dtype="float64",
        )
    return keras.layers.GroupNormalization(groups=GROUPS, axis=axis, dtype="float64")


def keras_defines(name, axis, batch, mask):
    """Whether Keras' layer computes this case.

    Its masks are channels-last and BatchNormalization's only, and a fully
    masked batch gets statistics 0 and 0 there (outputs of order 1/sqrt(ε)).
    """
    if mask is None:
        return batch > 0
    return name != "GroupNorm" and axis == -1 and bool(np.any(mask))


def initial_weights(name, rng):
    """Weights by name, float32 values (as our float32 layers hold them) in float64."""
    weights = {"gamma": rng.normal(1.0, 0.3, CHANNELS), "beta": rng.normal(0.0, 0.3, CHANNELS)}
    if name != "GroupNorm":
        weights["moving_mean"] = rng.normal(0.0, 1.0, CHANNELS)
        weights["moving_variance"] = rng.uniform(0.3, 3.0, CHANNELS)
    if name == "BatchRenorm":
        # renorm statistics that make r and d clip in some channels
        weights["moving_stddev"] = np.sqrt(weights["moving_variance"] + EPSILON)
        weights["renorm_mean"] = rng.normal(0.0, 1.0, CHANNELS)
        weights["renorm_stddev"] = rng.uniform(0.3, 3.0, CHANNELS)
    return {k: v.astype(np.float32).astype(np.float64) for k, v in weights.items()}


def layer_run(layer, shape, weights, mask, training):
    """`(call, variables, state)` for a Keras layer; `call` restores the weights first.

    Restoring before every call makes each call one step from the same state.
    """
    layer.build((None,) + tuple(shape[1:]))
    variables = [layer.gamma, layer.beta]
    mask_argument = {} if mask is None else {"mask": mask}

    def call(x):
        for variable in layer.weights:
            if variable.name in weights:
                variable.assign(weights[variable.name].astype(variable.dtype))
        return layer(x, training=training, **mask_argument)

    def state():
        return {v.name: v.numpy() for v in layer.weights if v.name in weights and not v.trainable}

    return call, variables, state


def formula_run(name, axis, weights, mask, training):
    """`(call, variables, state)` for the float64 formulas of `references.py`."""
    gamma = tf.Variable(weights["gamma"])
    beta = tf.Variable(weights["beta"])
    moments = {}

    def call(x):
        if name == "GroupNorm":
            return group_norm_formula(x, gamma, beta, GROUPS, EPSILON, axis, mask)
        if not training:
            return inference_formula(
                x, gamma, beta, weights["moving_mean"], weights["moving_variance"], EPSILON, axis
            )
        renorm = None
        if name == "BatchRenorm":
            renorm = dict(
                renorm_mean=weights["renorm_mean"],
                renorm_stddev=weights["renorm_stddev"],
                r_max=R_MAX,
                d_max=D_MAX,
            )
        y, *moments["batch"] = batch_norm_formula(x, gamma, beta, EPSILON, axis, mask, renorm)
        return y

    def state():
        initial = initial_weights_state(weights)
        if name == "GroupNorm" or not training:
            return initial
        mean, variance, count = (t.numpy() for t in moments["batch"])
        return expected_state(name, initial, mean, variance, count)

    return call, [gamma, beta], state


def initial_weights_state(weights):
    return {k: v for k, v in weights.items() if k not in ("gamma", "beta")}


def expected_state(name, initial, mean, variance, count):
    """The moving statistics after one training step (Keras' rules)."""
    if name == "BatchNorm":
        return {
            "moving_mean": moving_average_formula(initial["moving_mean"], mean, MOMENTUM, count),
            "moving_variance": moving_average_formula(
                initial["moving_variance"], variance, MOMENTUM, count
            ),
        }
    stddev = np.sqrt(variance + EPSILON)
    moving_stddev = moving_average_formula(initial["moving_stddev"], stddev, MOMENTUM, count)
    return {
        "moving_mean": moving_average_formula(initial["moving_mean"], mean, MOMENTUM, count),
        "moving_variance": tf.where(
            count > 0, tf.nn.relu(moving_stddev**2 - EPSILON), initial["moving_variance"]
        ),
        "moving_stddev": moving_stddev,
        "renorm_mean": moving_average_formula(
            initial["renorm_mean"], mean, RENORM_MOMENTUM, count
        ),
        "renorm_stddev": moving_average_formula(
            initial["renorm_stddev"], stddev, RENORM_MOMENTUM, count
        ),
    }


# -- what is compared ---------------------------------------------------------------


def derivatives(call, x, variables, weight, hand_derived):
    """The output, and the gradients of first and second order.

    First order: of `L = Σ weight · sin(y)` for `x` and `variables`. Second
    order: of the penalty `Σ ‖∂L/∂s‖²` over the same sources, with the inner
    gradient taken inside the outer tape. With `hand_derived`, the first order
    comes from a tape of its own: a layer's hand-derived gradient (what
    training uses) runs only when nothing records the gradient itself.
    """
    sources = [x] + variables
    zero = tf.UnconnectedGradients.ZERO
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = call(x)
            loss = tf.reduce_sum(weight * tf.sin(tf.cast(y, tf.float64)))
        first = inner.gradient(loss, sources, unconnected_gradients=zero)
        penalty = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float64) ** 2) for g in first])
    second = outer.gradient(penalty, sources, unconnected_gradients=zero)
    if hand_derived:
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = call(x)
            loss = tf.reduce_sum(weight * tf.sin(tf.cast(y, tf.float64)))
        first = tape.gradient(loss, sources, unconnected_gradients=zero)
    return {
        "y": y.numpy(),
        **{f"first_{i}": g.numpy() for i, g in enumerate(first)},
        **{f"second_{i}": g.numpy() for i, g in enumerate(second)},
    }


def results(run, x, weight, hand_derived=False):
    call, variables, state = run
    got = derivatives(call, x, variables, weight, hand_derived)
    # `call` restored the weights before each call: state is one step on.
    got.update({f"state_{k}": np.asarray(v) for k, v in state().items()})
    return got


def assert_close(got, want, tolerance, context):
    assert sorted(got) == sorted(want), context
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{context}: {key}"
        scale = max(1.0, float(np.abs(value).max(initial=0.0)))
        np.testing.assert_allclose(
            got[key], value, rtol=tolerance, atol=tolerance * scale, err_msg=f"{context}: {key}"
        )


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer configuration, checked at every batch size of `BATCHES`."""

    name: str
    rank: int
    axis: int
    masked: bool
    jit: bool
    training: bool
    dtype: str

    def factors(self):
        return (self.name, (self.rank, self.axis), self.masked, self.jit, self.training, self.dtype)

    def __repr__(self):
        return (
            f"{self.name}-rank{self.rank}-{'last' if self.axis == -1 else 'first'}-"
            f"{'masked' if self.masked else 'unmasked'}-{'xla' if self.jit else 'plain'}-"
            f"{'train' if self.training else 'infer'}-{self.dtype}"
        )


def covering_rows():
    """Every (layer, layout) pair once, 21 rows; the four two-valued factors (mask,
    kernels, mode, dtype) follow the bits of `(3·layout + 5·layer) mod 16`, which
    puts every value of every factor in a row with every value of every other
    (`test_rows_cover_every_pair_of_factor_values`)."""
    rows = []
    for i, name in enumerate(LAYERS):
        for j, (rank, axis) in enumerate(LAYOUTS):
            code = (3 * j + 5 * i) % 16
            rows.append(
                Row(name, rank, axis, *(bool(code & bit) for bit in (1, 2, 4)), DTYPES[code >> 3])
            )
    return rows


def full_grid():
    """All 336 combinations."""
    return [
        Row(name, rank, axis, masked, jit, training, dtype)
        for name in LAYERS
        for rank, axis in LAYOUTS
        for masked in (False, True)
        for jit in (True, False)
        for training in (True, False)
        for dtype in DTYPES
    ]


# KERASBN_FULL_GRID=1 checks every combination instead of the covering rows.
ROWS = full_grid() if os.environ.get("KERASBN_FULL_GRID") == "1" else covering_rows()


def test_rows_cover_every_pair_of_factor_values():
    rows = [row.factors() for row in covering_rows()]
    values = [set(column) for column in zip(*(row.factors() for row in full_grid()))]
    for a, b in itertools.combinations(range(len(values)), 2):
        seen = {(row[a], row[b]) for row in rows}
        assert seen == set(itertools.product(values[a], values[b])), (a, b)


def check_batch(row, batch):
    """The row at one batch size against every reference that defines it."""
    rng = np.random.default_rng([LAYERS.index(row.name), row.rank, row.axis % 7, batch])
    shape = input_shape(batch, row.rank, row.axis)
    x64 = rng.normal(2.0, 3.0, shape).astype(np.float32).astype(np.float64)
    weight = tf.constant(rng.normal(size=shape))
    mask = tf.constant(rng.random(mask_shape(shape, row.axis)) > 0.3) if row.masked else None
    weights = initial_weights(row.name, rng)
    context = f"{row!r}, batch {batch}"

    layer = our_layer(row.name, row.axis, row.jit, row.dtype)
    x = tf.constant(x64, row.dtype)
    run = layer_run(layer, shape, weights, mask, row.training)
    ours = results(run, x, weight, hand_derived=True)
    for key, value in ours.items():
        assert np.isfinite(value).all(), f"{context}: {key}"
    if batch == 0 or not row.training:
        # Nothing to learn from: the moving statistics are exactly as they were.
        for key, value in initial_weights_state(weights).items():
            np.testing.assert_array_equal(ours[f"state_{key}"], value.astype(row.dtype), context)
    if batch == 0:
        assert ours["y"].shape == shape, context
        for key, value in ours.items():
            if key.startswith(("first", "second")):
                np.testing.assert_array_equal(value, np.zeros_like(value), f"{context}: {key}")

    tolerance = TOLERANCE[row.dtype]
    x = tf.constant(x64)
    formula = results(formula_run(row.name, row.axis, weights, mask, row.training), x, weight)
    assert_close(ours, formula, tolerance, f"{context}, formula")
    if keras_defines(row.name, row.axis, batch, mask):
        theirs = layer_run(keras_layer(row.name, row.axis), shape, weights, mask, row.training)
        if mask is not None:
            tolerance = max(tolerance, KERAS_MASKED_TOLERANCE)
        assert_close(ours, results(theirs, x, weight), tolerance, f"{context}, keras")


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_layer_on_edge_batches(row):
    for batch in BATCHES:
        check_batch(row, batch)


# -- the real trigger: fit under MirroredStrategy -------------------------------------

WORKER = Path(__file__).parent / "distributed" / "empty_replica_worker.py"


def test_fit_with_an_empty_replica_trains_as_keras_layers_do(tmp_path):
    """Two replicas, 33 samples in global batches of 16: the last batch has one
    sample, so one replica gets none. Our GroupNorm and synchronized BatchNorm
    train exactly as Keras' layers do under the same strategy, from the same
    weights."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        import empty_replica_worker as worker
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    case = {
        "x": rng.normal(1.0, 2.0, (33, 5, 5, 2)).astype("float32"),
        "y": rng.normal(size=(33, 2)).astype("float32"),
        "kinds": np.array(sorted(worker.pairs())),
    }
    initial = {}
    for kind, (ours, _) in worker.pairs().items():
        initial[kind] = worker.build_model(ours).get_weights()
        case.update({f"{kind}/{i}": w for i, w in enumerate(initial[kind])})
    np.savez(tmp_path / "case.npz", **case)
    subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "case.npz"), str(tmp_path / "out.npz")],
        check=True,
        timeout=600,
    )
    trained = np.load(tmp_path / "out.npz")
    for kind, weights in initial.items():
        assert not np.allclose(trained[f"{kind}/ours/0"], weights[0])  # the kernel trained
        for index in range(len(weights)):
            ours, theirs = trained[f"{kind}/ours/{index}"], trained[f"{kind}/keras/{index}"]
            assert np.isfinite(ours).all()
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {index}")


# -- the block sums every kernel reduces with ----------------------------------------

# Lengths around both block sizes, and zero.
DIMENSIONS = st.sampled_from([0, 1, 3, TWO_INPUT_BLOCK + 1, BLOCK + 1])


@st.composite
def shapes_and_axes(draw):
    shape = tuple(draw(st.lists(DIMENSIONS, min_size=1, max_size=4)))
    return shape, tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1)))))


@settings(deadline=None, max_examples=30, derandomize=True)
@given(
    case=shapes_and_axes(),
    dtype=st.sampled_from(["float32", "float64"]),
    static=st.booleans(),
    jit=st.booleans(),
)
# The sums of the failures: batch norm channels-first, group norm's
# per-sample sums and its backward, on empty batches.
@example(case=((0, 8, 4), (0, 2)), dtype="float32", static=True, jit=True)
@example(case=((0, 4, 3), (0, 2)), dtype="float32", static=False, jit=False)
@example(case=((0, 2, 2), (2,)), dtype="float32", static=True, jit=False)
@example(case=((0, 5, 5, 2, 4), (1, 2, 4)), dtype="float64", static=False, jit=True)
@example(case=((0, 1, 1, 2, 4), (4,)), dtype="float32", static=True, jit=True)
def test_block_sums_equal_numpy_sums(case, dtype, static, jit):
    """`sum_over` and `sum_pair` against NumPy on any shape: zero-size axes,
    lengths around a block, static and unknown dimensions, XLA and plain."""
    shape, axes = case
    rng = np.random.default_rng(len(shape))
    # Small integers: every order of addition gives the exact sum.
    first, second = (rng.integers(-8, 9, shape).astype(dtype) for _ in range(2))
    spec = tf.TensorSpec(shape if static else [None] * len(shape), dtype)

    build = Build(for_xla=jit, block_sums=True)

    @tf.function(jit_compile=jit, input_signature=[spec, spec])
    def sums(a, b):
        return (sum_over(a, axes, build),) + sum_pair(a, b, axes, build)

    for got, values in zip(sums(first, second), (first, first, second)):
        np.testing.assert_array_equal(got.numpy(), values.sum(axis=axes, keepdims=True))
