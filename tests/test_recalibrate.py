"""kerasbn.recalibrate against NumPy population statistics."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from platform_support import requires_keras_renorm


def layer_inputs(model, layer_name, x, jit_compile=False):
    """Inputs of a layer over `x`, with every layer in inference mode, in float64."""
    probe = keras.Model(model.inputs, model.get_layer(layer_name).input)
    if jit_compile:
        probe.compile(jit_compile=True)
    return probe.predict(x, verbose=0).astype("float64")


def assert_exact(model, layer_name, x, axis=-1, jit_compile=False):
    h = layer_inputs(model, layer_name, x, jit_compile)
    axes = tuple(a for a in range(h.ndim) if a != axis % h.ndim)
    layer = model.get_layer(layer_name)
    np.testing.assert_allclose(layer.moving_mean.numpy(), h.mean(axis=axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), h.var(axis=axes), rtol=1e-5, atol=1e-7)


def branching_model():
    inputs = keras.Input((6,))
    a = kerasbn.BatchNorm(name="ours_a")(keras.layers.Dense(5)(inputs))
    b = keras.layers.BatchNormalization(name="keras_b")(keras.layers.Dense(4)(inputs))
    c = keras.layers.Dense(3, activation="relu")(keras.layers.Concatenate()([a, b]))
    return keras.Model(inputs, kerasbn.BatchNorm(name="ours_c")(c))


def conv_stack():
    layers = [keras.Input((8, 8, 2))]
    for i in range(3):
        layers += [keras.layers.Conv2D(4, 3, padding="same"), kerasbn.BatchNorm(name=f"bn{i}"), keras.layers.ReLU()]
    return keras.Sequential(layers)


def test_parallel_layers_share_a_pass_and_all_become_exact(rng):
    model = branching_model()
    x = rng.normal(2.0, 3.0, (100, 6)).astype("float32")
    reports = kerasbn.recalibrate(model, x, batch_size=16, verbose=0)
    assert {r.name: r.level for r in reports} == {"ours_a": 0, "keras_b": 0, "ours_c": 1}
    assert all(r.count == 100 for r in reports)
    for name in ("ours_a", "keras_b", "ours_c"):
        assert_exact(model, name, x)


def test_stacked_layers_are_exact_in_topological_passes(rng):
    model = conv_stack()
    x = rng.normal(1.0, 2.0, (40, 8, 8, 2)).astype("float32")
    reports = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
    assert [r.level for r in reports] == [0, 1, 2]
    for i in range(3):
        assert_exact(model, f"bn{i}", x)


def test_in_memory_x_y_tuple_uses_x_only(rng):
    # (x, y) as `fit` and `validation_data` take it: y must not be fed to the model.
    x = rng.normal(5.0, 2.0, (64, 3)).astype("float32")
    y = rng.normal(-5.0, 1.0, (64, 3)).astype("float32")
    for data in ((x, y), (x, y, np.ones(64, "float32")), (x,)):
        model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(name="bn")])
        (report,) = kerasbn.recalibrate(model, data, batch_size=10, verbose=0)
        assert report.count == 64
        assert_exact(model, "bn", x)


def test_in_memory_list_feeds_a_multi_input_model(rng):
    first, second = keras.Input((3,)), keras.Input((2,))
    joined = keras.layers.Concatenate()([first, keras.layers.Dense(3)(second)])
    model = keras.Model([first, second], kerasbn.BatchNorm(name="bn")(joined))
    x = [rng.normal(1.0, 2.0, (50, 3)).astype("float32"), rng.normal(size=(50, 2)).astype("float32")]
    (report,) = kerasbn.recalibrate(model, (x, np.zeros(50)), batch_size=8, verbose=0)
    assert report.count == 50
    assert_exact(model, "bn", x)


def test_list_of_batches_for_a_single_input_model(rng):
    # A list of arrays is batches unless the model has that many inputs;
    # the last batch may be smaller.
    x = rng.normal(3.0, 2.0, (40, 3)).astype("float32")
    for batches in ([x[:16], x[16:32], x[32:]], [tf.constant(x[i : i + 10]) for i in range(0, 40, 10)]):
        model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(name="bn")])
        (report,) = kerasbn.recalibrate(model, batches, verbose=0)
        assert report.count == 40
        assert_exact(model, "bn", x)


def test_in_memory_y_may_be_a_list_of_numbers(rng):
    x = rng.normal(3.0, 2.0, (12, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(name="bn")])
    (report,) = kerasbn.recalibrate(model, (x, list(range(12))), batch_size=5, verbose=0)
    assert report.count == 12
    assert_exact(model, "bn", x)


def test_in_memory_arrays_of_different_lengths_are_refused(rng):
    x = rng.normal(size=(64, 3)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm()])
    with pytest.raises(ValueError, match="`data`.*different lengths"):
        kerasbn.recalibrate(model, (x, x[:10]), verbose=0)


def test_report_measures_the_old_error(rng):
    model = keras.Sequential([keras.Input((3,)), kerasbn.BatchNorm(name="bn")])
    model.get_layer("bn").moving_mean.assign([1.0, 0.0, -1.0])
    model.get_layer("bn").moving_variance.assign([1.0, 2.0, 4.0])
    x = rng.normal(0.0, 2.0, (500, 3)).astype("float32")
    (report,) = kerasbn.recalibrate(model, x, verbose=0)
    mean, var = x.astype("float64").mean(0), x.astype("float64").var(0)
    std = np.sqrt(var + 1e-3)
    assert report.mean_error == pytest.approx(np.max(np.abs([1.0, 0.0, -1.0] - mean) / std), rel=1e-5)
    assert report.variance_error == pytest.approx(np.max(np.abs([1.0, 2.0, 4.0] / var - 1)), rel=1e-5)
    np.testing.assert_allclose(report.old_mean, [1.0, 0.0, -1.0])
    assert "bn" in str(report)


def test_inference_then_equals_training_mode_on_the_whole_data(rng):
    layer = kerasbn.BatchNorm()
    model = keras.Sequential([keras.Input((4,)), layer])
    x = rng.normal(5.0, 3.0, (64, 4)).astype("float32")
    kerasbn.recalibrate(model, x, batch_size=10, verbose=0)
    reference = keras.layers.BatchNormalization()(x, training=True)
    np.testing.assert_allclose(model(x, training=False), reference, atol=1e-4)


@pytest.mark.parametrize("form", ["dataset", "generator", "pydataset", "tensor"])
def test_data_forms_and_steps(rng, form):
    model = conv_stack()
    x = rng.normal(size=(48, 8, 8, 2)).astype("float32")
    y = np.zeros((48, 1), "float32")
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 48, 8)]

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return batches[index]

    data = {
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(8),
        "generator": (batch for batch in batches),
        "pydataset": Batches(),
        "tensor": tf.constant(x),
    }[form]
    reports = kerasbn.recalibrate(model, data, steps=4, batch_size=8, verbose=0)
    assert [r.count for r in reports] == [4 * 8 * 64] * 3
    for i in range(3):
        assert_exact(model, f"bn{i}", x[:32])


def test_masked_positions_are_excluded(rng):
    tokens = rng.integers(0, 6, (32, 7))
    inputs = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(6, 3, mask_zero=True)(inputs)
    model = keras.Model(inputs, kerasbn.BatchNorm(name="bn")(h))
    (report,) = kerasbn.recalibrate(model, tokens, batch_size=8, verbose=0)
    embedded = model.layers[1](tokens).numpy().astype("float64")[tokens != 0]
    assert report.count == int((tokens != 0).sum())
    np.testing.assert_allclose(model.get_layer("bn").moving_mean.numpy(), embedded.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.get_layer("bn").moving_variance.numpy(), embedded.var(0), rtol=1e-5)


def test_nested_models_and_channels_first(rng):
    # Channels-first batch norms around a channels-last convolution, which
    # every CPU runs (see the next test for a channels-first convolution).
    inner = keras.Sequential(
        [
            keras.Input((3, 5, 5)),
            keras.layers.Permute((2, 3, 1)),
            keras.layers.Conv2D(4, 3),
            keras.layers.Permute((3, 1, 2)),
            kerasbn.BatchNorm(axis=1, name="inner_bn"),
        ]
    )
    inputs = keras.Input((3, 5, 5))
    outputs = keras.layers.BatchNormalization(axis=1, name="outer_bn")(inner(inputs))
    model = keras.Model(inputs, outputs)
    x = rng.normal(size=(20, 3, 5, 5)).astype("float32")
    reports = kerasbn.recalibrate(model, x, batch_size=5, verbose=0)
    assert {r.name: r.level for r in reports} == {"inner_bn": 0, "outer_bn": 1}
    h = inner.predict(x, verbose=0).astype("float64")
    np.testing.assert_allclose(
        model.get_layer("outer_bn").moving_variance.numpy(), h.var(axis=(0, 2, 3)), rtol=1e-5
    )


def test_a_model_compiled_with_xla_is_recalibrated_through_xla(rng):
    """TensorFlow runs a channels-first Conv2D on a CPU only with oneDNN or inside
    XLA: compiled with jit_compile=True, such a model predicts on every CPU, and
    recalibrate runs it the same way."""
    inputs = keras.Input((3, 6, 6))
    h = keras.layers.Conv2D(4, 3, data_format="channels_first")(inputs)
    h = kerasbn.BatchNorm(axis=1, name="ours")(h)
    h = keras.layers.Conv2D(2, 3, data_format="channels_first")(keras.layers.ReLU()(h))
    model = keras.Model(inputs, keras.layers.BatchNormalization(axis=1, name="theirs")(h))
    model.compile(jit_compile=True)
    x = rng.normal(1.0, 2.0, (20, 3, 6, 6)).astype("float32")
    reports = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
    assert [(r.name, r.level, r.count) for r in reports] == [("ours", 0, 320), ("theirs", 1, 80)]
    for name in ("ours", "theirs"):
        assert_exact(model, name, x, axis=1, jit_compile=True)


def test_layers_are_restored_even_after_an_error(rng):
    model = branching_model()
    with pytest.raises(Exception):
        kerasbn.recalibrate(model, rng.normal(size=(8, 5)).astype("float32"), verbose=0)
    assert all("call" not in layer.__dict__ for layer in model.layers)
    x = rng.normal(size=(8, 6)).astype("float32")
    np.testing.assert_allclose(model(x), model.predict(x, verbose=0), atol=1e-6)


def test_progress_bar_is_shown(rng, capsys):
    kerasbn.recalibrate(conv_stack(), rng.normal(size=(64, 8, 8, 2)).astype("float32"), verbose=1)
    out = capsys.readouterr().out
    assert "Recalibration pass 3/3" in out and "2/2" in out


def test_bad_arguments_are_named(rng):
    x = rng.normal(size=(8, 6)).astype("float32")
    with pytest.raises(ValueError, match="`model`"):
        kerasbn.recalibrate(keras.Sequential([keras.layers.Dense(2)]), x)
    with pytest.raises(ValueError, match="`model`.*no BatchNorm"):
        kerasbn.recalibrate(keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)]), x)
    with pytest.raises(ValueError, match="`steps`"):
        kerasbn.recalibrate(branching_model(), x, steps=0)
    with pytest.raises(TypeError, match="`data`"):
        kerasbn.recalibrate(branching_model(), 3.0)
    with pytest.raises(ValueError, match="`data`.*no batch"):
        kerasbn.recalibrate(branching_model(), iter([]), verbose=0)
    with pytest.raises(ValueError, match="infinite"):
        kerasbn.recalibrate(branching_model(), tf.data.Dataset.from_tensors(x).repeat())


@pytest.mark.parametrize("second", ["kerasbn", pytest.param("keras", marks=requires_keras_renorm)])
def test_batch_renorm_layers_get_exact_statistics_in_every_moving_variable(rng, second):
    inputs = keras.Input((4,))
    a = kerasbn.BatchRenorm(name="ours")(keras.layers.Dense(3)(inputs))
    if second == "keras":
        theirs = keras.layers.BatchNormalization(renorm=True, name="theirs")
    else:
        theirs = kerasbn.BatchRenorm(name="theirs")
    b = theirs(keras.layers.Dense(2)(a))
    model = keras.Model(inputs, b)
    x = rng.normal(1.0, 2.0, (60, 4)).astype("float32")
    kerasbn.recalibrate(model, x, batch_size=16, verbose=0)
    for name in ("ours", "theirs"):
        assert_exact(model, name, x)
        layer = model.get_layer(name)
        h = layer_inputs(model, name, x)
        stddev = np.sqrt(h.var(axis=0) + layer.epsilon)
        np.testing.assert_allclose(layer.moving_stddev.numpy(), stddev, rtol=1e-5)
        np.testing.assert_allclose(layer.renorm_stddev.numpy(), stddev, rtol=1e-5)
        np.testing.assert_allclose(layer.renorm_mean.numpy(), h.mean(axis=0), rtol=1e-5, atol=1e-6)
