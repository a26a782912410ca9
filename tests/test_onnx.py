"""From `kerasbn.export_for_serving` to ONNX: tf2onnx converts the SavedModel, onnxruntime runs it.

Reference: the SavedModel itself, loaded with `tf.saved_model.load` and called
through its `serving_default` signature (that it matches the Keras model is
`test_export.py`'s business). Two small models, one of convolutions and one of
dense layers, hold `kerasbn.BatchNorm`, `kerasbn.BatchRenorm` and
`kerasbn.GroupNorm` with moving statistics trained away from their initial
values; each is exported folded (the default) and unfolded, and converted with
opset 17. The folded convolutional export goes through the command users run,
`python -m tf2onnx.convert --saved-model DIR --opset 17 --output F`; the others
through tf2onnx's Python API (`tf2onnx.convert.from_function` on the loaded
signature), which skips a second TensorFlow start-up.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn

tf2onnx = pytest.importorskip("tf2onnx")
onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")  # a dependency of tf2onnx

OPSET = 17
FLOAT32_EPS = float(np.finfo(np.float32).eps)
# The two runtimes sum the same float32 products in different orders (and with
# different kernels: TensorFlow's or oneDNN's against onnxruntime's MLAS), so
# they differ by the rounding of those sums: a few float32 epsilons of the
# outputs' magnitude (up to 4.5 measured, oneDNN on and off). 16 of them is far
# below any real error: shifting one channel's moving mean by 1% of its
# standard deviation moved these outputs by 7e-3 to 4e-2, scaling one GroupNorm
# gamma by 1.001 by 2e-4 to 1e-3 (thousands of epsilons).
EPSILONS = 16
CLI = ("conv", True)  # the export converted by the command users run


def conv_model():
    """Convolutions, each normalization kind once; one batch norm is not foldable (after a ReLU)."""
    image = keras.Input((8, 8, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same")(image)
    h = kerasbn.BatchNorm(momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(8, 3, use_bias=False)(h)
    h = kerasbn.BatchRenorm(momentum=0.5, renorm_momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    h = kerasbn.BatchNorm(momentum=0.5, activation="relu")(h)
    h = keras.layers.Conv2D(8, 1)(h)
    h = kerasbn.GroupNorm(groups=4)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(image, keras.layers.Dense(4, name="score")(h))


def dense_model():
    features = keras.Input((12,), name="features")
    h = keras.layers.Dense(16)(features)
    h = kerasbn.BatchNorm(momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dense(16, use_bias=False)(h)
    h = kerasbn.BatchRenorm(momentum=0.5, renorm_momentum=0.5)(h)
    h = keras.layers.Dense(16)(h)
    h = kerasbn.GroupNorm(groups=4, activation="relu")(h)
    return keras.Model(features, keras.layers.Dense(3, name="score")(h))


MODELS = {"conv": conv_model, "dense": dense_model}


def inputs_like(model, batch, rng):
    """Inputs whose mean and spread are far from 0 and 1, so the statistics are too."""
    shape = (batch,) + tuple(model.input.shape[1:])
    return (rng.normal(size=shape) * 3.0 + 1.5).astype("float32")


def trained(model, rng):
    """A few SGD steps: the moving statistics move off their initial zeros and ones."""
    x = inputs_like(model, 64, rng)
    y = rng.normal(size=(64, model.output.shape[-1])).astype("float32")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for layer in model.layers:
        if isinstance(layer, kerasbn.BatchNorm):  # BatchRenorm included
            assert np.abs(layer.moving_mean.numpy()).min() > 1e-3, layer.name
            assert np.abs(layer.moving_variance.numpy() - 1.0).min() > 1e-3, layer.name
    return model


def convert_with_the_command(saved_model, output):
    """`python -m tf2onnx.convert --saved-model DIR --opset 17 --output F`, as a user runs it."""
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model]
    command += ["--opset", str(OPSET), "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return onnx.load(str(output))


def convert_with_the_api(signature):
    """tf2onnx's Python API on the loaded `serving_default` signature."""
    names = list(signature.structured_input_signature[1])
    specs = [signature.structured_input_signature[1][name] for name in names]

    @tf.function
    def serve(*tensors):
        return signature(**dict(zip(names, tensors)))

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=OPSET)
    return proto


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """`{(model name, folded): (Keras model, loaded SavedModel, its signature, ONNX model, session)}`."""
    directory = tmp_path_factory.mktemp("onnx")
    keras.utils.set_random_seed(26)  # the initial weights too
    rng = np.random.default_rng(26)
    built = {}
    for name, build in MODELS.items():
        model = trained(build(), rng)
        for fold in (True, False):
            path = kerasbn.export_for_serving(model, directory / f"{name}_{fold}" / "1", fold_batchnorm=fold)
            loaded = tf.saved_model.load(path)
            signature = loaded.signatures["serving_default"]
            if (name, fold) == CLI:
                proto = convert_with_the_command(path, directory / f"{name}_{fold}.onnx")
            else:
                proto = convert_with_the_api(signature)
            session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            # `loaded` keeps the signature's variables alive.
            built[name, fold] = (model, loaded, signature, proto, session)
    return built


CASES = [
    pytest.param((name, fold), id=f"{name}-{'folded' if fold else 'unfolded'}")
    for name in MODELS
    for fold in (True, False)
]


def max_difference(export, batch, seed):
    """`(max |onnxruntime − SavedModel|, max |SavedModel|)` over every output, on one batch."""
    model, _, signature, _, session = export
    x = inputs_like(model, batch, np.random.default_rng(seed))
    (input_name,) = signature.structured_input_signature[1]
    expected = {k: v.numpy() for k, v in signature(**{input_name: tf.constant(x)}).items()}
    names = [output.name for output in session.get_outputs()]
    actual = dict(zip(names, session.run(names, {input_name: x})))
    assert sorted(actual) == sorted(expected)
    difference = max(float(np.abs(actual[k] - expected[k]).max()) for k in expected)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    return difference, scale


@pytest.mark.parametrize("key", CASES)
def test_onnxruntime_gives_the_saved_models_outputs_to_float32_rounding(exports, key):
    for batch, seed in ((7, 1), (1, 2)):  # the batch dimension stays unknown
        difference, scale = max_difference(exports[key], batch, seed)
        assert difference <= EPSILONS * FLOAT32_EPS * max(1.0, scale), (batch, difference, scale)


@pytest.mark.parametrize("key", CASES)
def test_the_onnx_model_has_only_standard_opset_17_ops_and_the_signatures_names(exports, key):
    _, _, signature, proto, _ = exports[key]
    # A TensorFlow op tf2onnx could not convert would be left in a custom
    # domain and fail the checker (the Python API converts with
    # continue_on_error=True, so the checker is what catches it).
    onnx.checker.check_model(proto, full_check=True)
    assert {(o.domain, o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {("", OPSET)}
    assert {node.domain for node in proto.graph.node} <= {""}
    assert [i.name for i in proto.graph.input] == list(signature.structured_input_signature[1])
    assert sorted(o.name for o in proto.graph.output) == sorted(signature.structured_outputs)
    (batch_dim, *_) = proto.graph.input[0].type.tensor_type.shape.dim
    assert not batch_dim.HasField("dim_value")  # unknown, as in the signature


def test_folded_dense_export_leaves_less_arithmetic_to_onnx(exports):
    """Folded, the dense model's batch norms are gone from the ONNX graph too; only
    GroupNorm's arithmetic is left. (A batch norm after a convolution left in the
    SavedModel, tf2onnx folds into the ONNX `Conv` itself: the two conv graphs
    are the same size.)"""
    folded, unfolded = (len(exports["dense", fold][3].graph.node) for fold in (True, False))
    assert folded < unfolded
