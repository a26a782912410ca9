"""No retracing or recompilation per step in `fit`.

Over several epochs with a fixed batch size, the traces of our kernels (forward
and backward programs, XLA and plain) and of the model's train step are counted
after every batch: they must not change after the first one. A retrace per step
would also mean an XLA compilation per step. The inputs are small, so
`min_elements=0` keeps the kernels on their programs (by default a small input
runs inline in the step, with no program of its own to retrace).

Separately, a jit-compiled training step must take the input as an XLA
parameter: if XLA's constant analysis decided it needs the input's *value* at
compile time, every call would recompile (and constant-fold the whole step)
without a single retrace.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import kernels
from kerasbn.kernels.build import Build

LAYERS = {
    "BatchNorm": ("normalize_batch", dict()),
    "BatchRenorm": ("normalize_batch", dict(r_max=3.0, d_max=5.0)),
    "GroupNorm": ("group_norm", dict(groups=4)),
}


def _make_layer(name):
    if not hasattr(kerasbn, name) or not hasattr(kernels, LAYERS[name][0]):
        pytest.skip(f"kerasbn.{name} is not available")
    return getattr(kerasbn, name)(**LAYERS[name][1])


def _kernel_traces(name):
    return getattr(kernels, LAYERS[name][0]).experimental_get_tracing_count()


class _Recorder(keras.callbacks.Callback):
    def __init__(self, read):
        super().__init__()
        self.read = read
        self.records = []

    def on_train_batch_end(self, batch, logs=None):
        self.records.append(self.read())


@pytest.mark.parametrize("fit_jit", [True, False], ids=["fit-jit", "fit-no-jit"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_fit_traces_once_with_a_fixed_batch_size(onednn_reported_off, name, fit_jit):
    layer = _make_layer(name)
    # The kernels are module-level: this fit may reuse traces made by earlier
    # tests (a relaxed trace covers every batch size). What matters is that the
    # counts do not move from one step to the next.
    channels = 8 if fit_jit else 12
    model = keras.Sequential(
        [
            keras.Input((6, 6, channels)),
            layer,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="sgd", loss="mse", jit_compile=fit_jit)
    step_traces = []
    train_step = model.train_step

    def counted_train_step(data):
        step_traces.append(1)  # runs once per trace (the step is a tf.function)
        return train_step(data)

    model.train_step = counted_train_step
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6, 6, channels)).astype("float32")
    y = rng.normal(size=(48, 2)).astype("float32")
    recorder = _Recorder(lambda: (_kernel_traces(name), len(step_traces)))
    with kernels.xla_policy(min_elements=0):
        model.fit(x, y, batch_size=8, epochs=3, shuffle=True, verbose=0, callbacks=[recorder])

    assert len(recorder.records) == 3 * 6
    assert recorder.records[0][0] > 0
    assert recorder.records[0][1] >= 1
    assert set(recorder.records) == {recorder.records[0]}, recorder.records


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_jit_training_step_takes_the_input_as_a_parameter(name):
    layer = _make_layer(name)
    x = tf.random.normal([16, 5, 5, 8])
    layer.build(x.shape)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        return tape.gradient(loss, [x] + list(layer.trainable_weights))

    hlo = step.experimental_get_compiler_ir(x)(stage="hlo")
    entry = hlo[hlo.index("ENTRY") :].splitlines()[0]
    assert "f32[16,5,5,8]" in entry.split("->")[0], entry


def test_statistics_keep_computed_shapes_off_the_backward():
    """The kernel body differentiated as one nested XLA function, not through `Compiled`.

    `moments` stops gradients on its results; without that, TensorFlow builds
    gradients of the reshapes inside `sum_over`, the backward needs their
    computed shapes, and XLA then requires the input's value at compile time.
    """
    x = tf.random.normal([16, 5, 5, 8])
    ones, zeros = tf.ones([8]), tf.zeros([8])
    build = Build(for_xla=True, block_sums=True)

    def inner(x, gamma, beta):
        return kernels.normalize_batch.fn(x, gamma, beta, build=build, epsilon=1e-3, feature_axes=(3,))


    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, _ = inner(x, ones, zeros)
            loss = tf.reduce_sum(tf.square(y))
        return tape.gradient(loss, x)

    hlo = step.experimental_get_compiler_ir(x)(stage="hlo")
    entry = hlo[hlo.index("ENTRY") :].splitlines()[0]
    assert "f32[16,5,5,8]" in entry.split("->")[0], entry


def test_group_norms_of_different_group_counts_share_one_trace():
    """A model's GroupNorms differ in group count: one trace serves them all.

    The count reaches the programs as a run-time tensor (`per_layer_ints`):
    traced per value, a MobileNetV2 with 12 counts spent most of its first
    training step tracing and optimizing copies of the programs. XLA compiles
    per value, so the outputs and gradients are checked against Keras' layers.
    """
    channels = 30
    shape = (6, 4, 4, channels)
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=shape), tf.float32)

    def step_of(layers):
        @tf.function(input_signature=[tf.TensorSpec((None,) + shape[1:], tf.float32)])
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = [layer(x, training=True) for layer in layers]
                loss = tf.add_n([tf.reduce_sum(tf.square(y) * (i + 1)) for i, y in enumerate(outputs)])
            weights = [w for layer in layers for w in layer.trainable_weights]
            return outputs, tape.gradient(loss, [x] + weights)

        return step

    def make(cls, groups):
        layer = cls(groups=groups, epsilon=1e-3)
        layer.build(shape)
        for weight in layer.trainable_weights:
            weight.assign(rng.normal(size=weight.shape) + (1.0 if "gamma" in weight.path else 0.0))
        return layer

    with kernels.xla_policy(warmup_calls=0, min_elements=0):
        step_of([make(kerasbn.GroupNorm, 3)])(x)
        traced = _kernel_traces("GroupNorm")
        counts = (5, 6, 15)
        ours = [make(kerasbn.GroupNorm, g) for g in counts]
        outputs, gradients = step_of(ours)(x)
        assert _kernel_traces("GroupNorm") == traced

    theirs = [keras.layers.GroupNormalization(groups=g, epsilon=1e-3) for g in counts]
    for mine, keras_layer in zip(ours, theirs):
        keras_layer.build(shape)
        keras_layer.set_weights(mine.get_weights())
    expected_outputs, expected_gradients = step_of(theirs)(x)
    for got, expected in zip(outputs + gradients, expected_outputs + expected_gradients):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=2e-4, atol=2e-4)
