"""`kerasbn.export_for_serving`: folding, the served graph, signatures, bad input.

References: NumPy for the folding arithmetic, and the Keras model's own
`predict` (which runs the batch norms as layers) for every exported model.
"""

import os
import stat
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

import kerasbn
from kerasbn.export import ExportDirExistsError, folding
from kerasbn.export.graph import find_fold_pairs
from platform_support import runs_channels_first_conv
from serving.isolation import load_in_fresh_process

RTOL = 1e-5
ATOL = 1e-5
NORMALIZATION_OPS = {"Rsqrt", "Sqrt", "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3"}
PY_FUNC_OPS = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


# -- helpers ------------------------------------------------------------------


def randomize(model, seed=0):
    """Weights from a seeded generator; moving statistics far from 0 and 1."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            value = rng.uniform(0.2, 3.0, shape)
        elif "moving_mean" in variable.path:
            value = rng.normal(0.0, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.7, shape)
        variable.assign(value.astype(variable.dtype))
    return model


def random_inputs(model, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    return {
        t.name: rng.normal(size=(batch,) + tuple(t.shape[1:])).astype("float32")
        for t in model.inputs
    }


def keras_outputs(model, inputs, jit_compile=False):
    """`{output name: array}` computed by the Keras model itself (through XLA if asked)."""
    arrays = [inputs[t.name] for t in model.inputs]
    if jit_compile:
        model.compile(jit_compile=True)
    outputs = model.predict(arrays[0] if len(arrays) == 1 else arrays, verbose=0)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return dict(zip(model.output_names, outputs))


def serve(path, inputs, jit_compile=False):
    """Outputs of the SavedModel's signature, called inside an XLA function if asked."""
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["serving_default"]

    def call(kwargs):
        return signature(**kwargs)

    if jit_compile:
        call = tf.function(call, jit_compile=True)
    outputs = call({k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(actual[name], value, rtol=rtol, atol=atol * scale, err_msg=name)


def meta_graph(path):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    (graph,) = proto.meta_graphs
    return graph


def must_compile(attrs):
    return "_XlaMustCompile" in attrs and attrs["_XlaMustCompile"].b


def graph_report(path):
    """Ops, XLA markers and variable names of a SavedModel, from its protobuf."""
    graph = meta_graph(path)
    library = graph.graph_def.library
    functions = {f.signature.name for f in library.function}
    node_defs = list(graph.graph_def.node) + [n for f in library.function for n in f.node_def]
    ops = {n.op for n in node_defs}
    # tf.function(jit_compile=False) writes `_XlaMustCompile: false`: only True counts.
    xla = [f.signature.name for f in library.function if must_compile(f.attr)]
    xla += [n.name for n in node_defs if must_compile(n.attr)]
    variables = [
        n.variable.name for n in graph.object_graph_def.nodes if n.HasField("variable")
    ]
    unknown = {op for op in ops if op not in functions and op_def_registry.get(op) is None}
    return {"ops": ops, "xla": xla, "variables": variables, "unknown_ops": unknown}


# -- folding arithmetic against NumPy -------------------------------------------


def numpy_batch_norm(y, mean, variance, epsilon, gamma, beta):
    return gamma * (y - mean) / np.sqrt(variance + epsilon) + beta


def test_folding_a_dense_kernel_matches_numpy(rng):
    x = rng.normal(size=(7, 5))
    kernel, bias = rng.normal(size=(5, 4)), rng.normal(size=4)
    mean, variance = rng.normal(size=4), rng.uniform(0.1, 2, 4)
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    scale, shift = folding.batchnorm_affine(mean, variance, 1e-3, gamma, beta)
    folded_kernel, folded_bias = folding.fold_affine_into_kernel(kernel, bias, scale, shift)
    expected = numpy_batch_norm(x @ kernel + bias, mean, variance, 1e-3, gamma, beta)
    np.testing.assert_allclose(x @ folded_kernel + folded_bias, expected, rtol=1e-12, atol=1e-12)
    # No bias, no gamma, no beta: the neutral values stand in.
    scale, shift = folding.batchnorm_affine(mean, variance, 0.5)
    folded_kernel, folded_bias = folding.fold_affine_into_kernel(kernel, None, scale, shift)
    expected = (x @ kernel - mean) / np.sqrt(variance + 0.5)
    np.testing.assert_allclose(x @ folded_kernel + folded_bias, expected, rtol=1e-12, atol=1e-12)


def test_folding_a_depthwise_kernel_matches_tensorflow_and_numpy(rng):
    x = rng.normal(size=(2, 5, 5, 3))
    kernel = rng.normal(size=(3, 3, 3, 2))  # in=3, multiplier=2: 6 output channels
    mean, variance = rng.normal(size=6), rng.uniform(0.1, 2, 6)
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    scale, shift = folding.batchnorm_affine(mean, variance, 1e-3, gamma, beta)
    folded_kernel, folded_bias = folding.fold_affine_into_kernel(
        kernel, None, scale, shift, folding.DEPTHWISE
    )

    def depthwise(k):
        return tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "VALID").numpy()

    expected = numpy_batch_norm(depthwise(kernel), mean, variance, 1e-3, gamma, beta)
    np.testing.assert_allclose(depthwise(folded_kernel) + folded_bias, expected, atol=1e-10)


def test_folding_keeps_the_kernel_dtype_and_rejects_mismatches(rng):
    kernel = rng.normal(size=(3, 4)).astype("float32")
    scale, shift = folding.batchnorm_affine(np.zeros(4), np.ones(4), 1e-3)
    folded_kernel, folded_bias = folding.fold_affine_into_kernel(kernel, None, scale, shift)
    assert folded_kernel.dtype == np.float32 and folded_bias.dtype == np.float32
    with pytest.raises(ValueError, match="output channels"):
        folding.fold_affine_into_kernel(rng.normal(size=(3, 5)), None, scale, shift)
    with pytest.raises(ValueError, match="layout"):
        folding.fold_affine_into_kernel(kernel, None, scale, shift, "transposed")
    with pytest.raises(ValueError, match="1-D"):
        folding.batchnorm_affine(np.zeros(4), np.ones(3), 1e-3)
    with pytest.raises(ValueError, match="positive"):
        folding.batchnorm_affine(np.zeros(2), np.array([1.0, -1.0]), 1e-3)


# -- which batch norms are folded -------------------------------------------------


def foldable_model():
    """One branch per foldable (producer, batch norm) pair; one output each.

    Channels-first convolutions are in `channels_first_model`: TensorFlow runs
    them on a CPU only with oneDNN or inside XLA.
    """
    renorm = getattr(kerasbn, "BatchRenorm", None)
    inputs, outputs = [], []

    def branch(name, shape, producer, normalization):
        x = keras.Input(shape, name=f"{name}_in")
        inputs.append(x)
        outputs.append(normalization(producer(x)))

    branch("c1", (9, 3), keras.layers.Conv1D(4, 3, name="c1"), kerasbn.BatchNorm(name="c1_bn"))
    branch(
        "c2",
        (6, 6, 4),
        keras.layers.Conv2D(6, 3, name="c2"),
        keras.layers.BatchNormalization(name="c2_bn"),
    )
    branch(
        "c3",
        (4, 4, 4, 2),
        keras.layers.Conv3D(3, 2, use_bias=False, name="c3"),
        kerasbn.BatchNorm(center=False, name="c3_bn"),
    )
    branch(
        "dw",
        (6, 6, 3),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
        kerasbn.BatchNorm(scale=False, epsilon=0.1, name="dw_bn"),
    )
    branch(
        "dw1",
        (8, 2),
        keras.layers.DepthwiseConv1D(3, depth_multiplier=3, use_bias=False, name="dw1"),
        keras.layers.BatchNormalization(epsilon=1e-2, name="dw1_bn"),
    )
    branch("d3", (5, 4), keras.layers.Dense(3, name="d3"), kerasbn.BatchNorm(name="d3_bn"))
    if renorm is not None:
        branch("dr", (4,), keras.layers.Dense(3, name="dr"), renorm(name="dr_bn"))
    nested = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(2, name="inner"),
            kerasbn.BatchNorm(name="inner_bn"),
        ],
        name="nested",
    )
    branch("nest", (5,), lambda x: x, nested)
    return keras.Model(inputs, outputs, name="foldable")


def unfoldable_model():
    """Batch norms that must not be folded; the reason is in each name."""
    x = keras.Input((6, 6, 2), name="x")
    outputs = []
    relu_conv = keras.layers.Conv2D(3, 3, activation="relu", name="activated")(x)
    outputs.append(kerasbn.BatchNorm(name="after_activation")(relu_conv))
    conv = keras.layers.Conv2D(3, 3, name="conv")(x)
    outputs.append(kerasbn.BatchNorm(name="after_relu")(keras.layers.ReLU()(conv)))
    two = keras.layers.Conv2D(3, 3, name="two_consumers")(x)
    outputs.append(kerasbn.BatchNorm(name="one_of_two")(two))
    outputs.append(keras.layers.Flatten(name="other_consumer")(two))
    visible = keras.layers.Conv2D(3, 3, name="visible")(x)
    outputs.append(visible)  # the producer's output is a model output too
    outputs.append(keras.layers.BatchNormalization(name="of_visible")(visible))
    rows = keras.layers.Conv2D(3, 3, name="rows")(x)
    outputs.append(kerasbn.BatchNorm(axis=1, name="over_rows")(rows))
    shared = keras.layers.Conv2D(3, 3, name="shared")
    outputs.append(kerasbn.BatchNorm(name="after_shared")(shared(x)))
    outputs.append(shared(x))
    transposed = keras.layers.Conv2DTranspose(3, 3, name="transposed")(x)
    outputs.append(kerasbn.BatchNorm(name="after_transposed")(transposed))
    return keras.Model(x, outputs, name="unfoldable")


def test_every_supported_pair_is_found():
    model = foldable_model()
    found = {(p.producer.name, p.normalization.name) for p in find_fold_pairs(model)}
    names = ["c1", "c2", "c3", "dw", "dw1", "d3", "inner"]
    if hasattr(kerasbn, "BatchRenorm"):
        names.append("dr")
    assert found == {(name, f"{name}_bn") for name in names}


def test_unsupported_pairs_are_not_folded():
    assert find_fold_pairs(unfoldable_model()) == []


def test_an_explicit_training_call_is_not_folded():
    x = keras.Input((4,))
    y = kerasbn.BatchNorm()(keras.layers.Dense(3)(x), training=True)
    assert find_fold_pairs(keras.Model(x, y)) == []


# -- the exported models -------------------------------------------------------------


@pytest.fixture(scope="module")
def foldable_exports(tmp_path_factory):
    """The foldable model exported folded and unfolded, and its Keras outputs."""
    keras.utils.clear_session()
    model = randomize(foldable_model())
    inputs = random_inputs(model)
    expected = keras_outputs(model, inputs)
    nodes = {layer.name: len(layer._inbound_nodes) for layer in model._flatten_layers()}
    weights = [w.copy() for w in model.get_weights()]
    root = tmp_path_factory.mktemp("foldable")
    folded = kerasbn.export_for_serving(model, root / "folded" / "1")
    unfolded = kerasbn.export_for_serving(model, root / "unfolded" / "1", fold_batchnorm=False)
    after = {layer.name: len(layer._inbound_nodes) for layer in model._flatten_layers()}
    untouched = after == nodes and all(
        np.array_equal(a, b) for a, b in zip(weights, model.get_weights())
    )
    return {
        "model": model,
        "inputs": inputs,
        "expected": expected,
        "folded": folded,
        "unfolded": unfolded,
        "untouched": untouched,
    }


def test_folded_export_matches_keras_and_does_no_normalization(foldable_exports):
    e = foldable_exports
    assert e["folded"] == os.path.abspath(e["folded"]) and os.path.isdir(e["folded"])
    assert_close(serve(e["folded"], e["inputs"]), e["expected"])
    report = graph_report(e["folded"])
    assert not report["ops"] & NORMALIZATION_OPS
    assert not [v for v in report["variables"] if "moving" in v or "gamma" in v or "beta" in v]


def test_unfolded_export_matches_keras_and_keeps_the_normalization(foldable_exports):
    e = foldable_exports
    assert_close(serve(e["unfolded"], e["inputs"]), e["expected"])
    report = graph_report(e["unfolded"])
    assert "Rsqrt" in report["ops"]
    assert any("moving_variance" in v for v in report["variables"])


def test_folded_and_unfolded_exports_agree_to_float32_rounding(foldable_exports):
    e = foldable_exports
    assert_close(serve(e["folded"], e["inputs"]), serve(e["unfolded"], e["inputs"]))


def test_export_leaves_the_model_untouched(foldable_exports):
    assert foldable_exports["untouched"]


@pytest.mark.parametrize("which", ["folded", "unfolded"])
def test_served_graph_has_only_standard_ops_and_no_xla(foldable_exports, which):
    report = graph_report(foldable_exports[which])
    assert report["xla"] == []
    assert not report["ops"] & PY_FUNC_OPS
    assert report["unknown_ops"] == set()


def test_signature_names_and_unknown_batch_dimension(foldable_exports):
    e = foldable_exports
    signature = meta_graph(e["folded"]).signature_def["serving_default"]
    assert sorted(signature.inputs) == sorted(t.name for t in e["model"].inputs)
    assert sorted(signature.outputs) == sorted(e["model"].output_names)
    for info in list(signature.inputs.values()) + list(signature.outputs.values()):
        assert info.tensor_shape.dim[0].size == -1
    served = tf.saved_model.load(e["folded"]).signatures["serving_default"]
    for batch in (1, 5):
        inputs = random_inputs(e["model"], batch=batch, seed=batch)
        outputs = served(**{k: tf.constant(v) for k, v in inputs.items()})
        assert_close({k: v.numpy() for k, v in outputs.items()}, keras_outputs(e["model"], inputs))


def channels_first_model():
    """Channels-first convolutions, each followed by a batch norm over axis 1."""
    x = keras.Input((2, 6, 6), name="cf_in")
    y = keras.layers.Conv2D(3, 3, data_format="channels_first", name="cf")(x)
    y = kerasbn.BatchNorm(axis=1, name="cf_bn")(y)
    s = keras.Input((3, 9), name="cf1_in")
    z = keras.layers.Conv1D(4, 3, data_format="channels_first", use_bias=False, name="cf1")(s)
    z = keras.layers.BatchNormalization(axis=1, epsilon=1e-2, name="cf1_bn")(z)
    return keras.Model([x, s], [y, z], name="channels_first")


def test_channels_first_convolutions_are_folded_and_match_keras_on_every_cpu(tmp_path):
    """The Keras reference and both exports are evaluated inside XLA, which runs
    channels-first convolutions on any CPU; where TensorFlow also runs them as
    plain ops (oneDNN on), the served graphs are checked as they are too."""
    model = randomize(channels_first_model(), seed=17)
    found = {(p.producer.name, p.normalization.name) for p in find_fold_pairs(model)}
    assert found == {("cf", "cf_bn"), ("cf1", "cf1_bn")}
    inputs = random_inputs(model)
    expected = keras_outputs(model, inputs, jit_compile=True)
    folded = kerasbn.export_for_serving(model, tmp_path / "folded" / "1")
    unfolded = kerasbn.export_for_serving(model, tmp_path / "unfolded" / "1", fold_batchnorm=False)
    folded_report, unfolded_report = graph_report(folded), graph_report(unfolded)
    assert not folded_report["ops"] & NORMALIZATION_OPS and "Rsqrt" in unfolded_report["ops"]
    for report in (folded_report, unfolded_report):
        assert report["xla"] == [] and report["unknown_ops"] == set()
    for path in (folded, unfolded):
        assert_close(serve(path, inputs, jit_compile=True), expected)
        if runs_channels_first_conv():
            assert_close(serve(path, inputs), expected)


def test_unfoldable_model_exports_unchanged_and_matches_keras(tmp_path):
    model = randomize(unfoldable_model(), seed=3)
    inputs = random_inputs(model)
    path = kerasbn.export_for_serving(model, tmp_path / "1")
    assert_close(serve(path, inputs), keras_outputs(model, inputs))
    assert graph_report(path)["xla"] == []


def test_sequential_model_is_folded_and_named(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,), name="features"),
            keras.layers.Dense(5, name="hidden"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dense(2, activation="softmax", name="probabilities"),
        ]
    )
    randomize(model, seed=5)
    assert [(p.producer.name, p.normalization.name) for p in find_fold_pairs(model)] == [
        ("hidden", "bn")
    ]
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    path = kerasbn.export_for_serving(model, tmp_path / "1")
    outputs = serve(path, {"features": x})
    assert list(outputs) == ["probabilities"]
    np.testing.assert_allclose(outputs["probabilities"], model.predict(x, verbose=0), atol=1e-6)
    assert not graph_report(path)["ops"] & NORMALIZATION_OPS


def test_jit_compile_true_marks_the_function_for_xla(tmp_path):
    model = randomize(
        keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(3), kerasbn.BatchNorm()])
    )
    x = {"x": np.ones((2, 4), "float32")}
    path = kerasbn.export_for_serving(model, tmp_path / "1", jit_compile=True)
    assert graph_report(path)["xla"] != []
    np.testing.assert_allclose(
        list(serve(path, x).values())[0], model.predict(x["x"], verbose=0), atol=1e-5
    )


def test_keras_xla_compiled_layers_need_jit_compile_true(tmp_path):
    """Keras compiles grouped convolutions with XLA on CPU: refused unless asked for."""
    x = keras.Input((6, 6, 4), name="x")
    y = kerasbn.BatchNorm(name="bn")(keras.layers.Conv2D(6, 3, groups=2, name="grouped")(x))
    model = randomize(keras.Model(x, y), seed=13)
    with pytest.raises(ValueError, match="jit_compile=True"):
        kerasbn.export_for_serving(model, tmp_path / "refused" / "1")
    assert list(tmp_path.iterdir()) == []
    assert len(find_fold_pairs(model)) == 1
    path = kerasbn.export_for_serving(model, tmp_path / "1", jit_compile=True)
    report = graph_report(path)
    assert report["xla"] != [] and not report["ops"] & NORMALIZATION_OPS
    inputs = random_inputs(model)
    assert_close(serve(path, inputs), keras_outputs(model, inputs))


@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_conversion_gives_the_same_outputs(tmp_path):
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    h = kerasbn.BatchNorm(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="scores")(h)
    model = randomize(keras.Model(inputs, outputs), seed=7)
    x = np.random.default_rng(2).uniform(size=(3, 8, 8, 1)).astype("float32")
    path = kerasbn.export_for_serving(model, tmp_path / "1")

    converter = tf.lite.TFLiteConverter.from_saved_model(path)
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    (input_detail,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(input_detail["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], x)
    interpreter.invoke()
    (output_detail,) = interpreter.get_output_details()
    result = interpreter.get_tensor(output_detail["index"])
    np.testing.assert_allclose(result, model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


# -- mixed precision ---------------------------------------------------------------


def mixed_precision_model(policy):
    """A Conv2D and a Dense branch, each followed by a foldable batch norm."""
    keras.config.set_dtype_policy(policy)
    try:
        image = keras.Input((8, 8, 3), name="image")
        features = keras.Input((24,), name="features")
        conv = kerasbn.BatchNorm(name="conv_bn")(keras.layers.Conv2D(16, 3, name="conv")(image))
        dense = kerasbn.BatchNorm(name="dense_bn")(keras.layers.Dense(16, name="dense")(features))
        return keras.Model([image, features], [conv, dense])
    finally:
        keras.config.set_dtype_policy("float32")


def producer_terms(model, inputs, absolute):
    """Each producer's output in float64, or with `absolute` `|x| ⊛ |K| + |c|`."""
    terms = {}
    for name, input_name in (("conv", "image"), ("dense", "features")):
        layer = model.get_layer(name)
        x, kernel, bias = inputs[input_name], layer.kernel.numpy(), layer.bias.numpy()
        if absolute:
            x, kernel, bias = np.abs(x), np.abs(kernel), np.abs(bias)
        x = tf.constant(x, tf.float64)
        if name == "conv":
            terms[name] = tf.nn.conv2d(x, kernel, 1, "VALID").numpy() + bias
        else:
            terms[name] = x.numpy() @ kernel + bias
    return terms


@pytest.mark.parametrize("policy,unit_roundoff", [("mixed_float16", 2**-11), ("mixed_bfloat16", 2**-8)])
def test_folding_under_mixed_precision_is_as_exact_as_the_model(tmp_path, policy, unit_roundoff):
    """Folded or not, the producer computes in the compute dtype: the export and
    `predict` are off the exact (float64) result by the same rounding, and
    differ by at most 2u·S, S = |γ|/sqrt(σ² + ε)·(|x| ⊛ |K| + |c|) (docs/serving.md's
    bound). The dense branch's inputs have a mean ten times their spread."""
    rng = np.random.default_rng(0)
    inputs = {
        "image": rng.normal(0.0, 1.0, (64, 8, 8, 3)).astype("float32"),
        "features": rng.normal(10.0, 1.0, (64, 24)).astype("float32"),
    }
    exact_model = randomize(mixed_precision_model("float64"))
    for name, terms in producer_terms(exact_model, inputs, absolute=False).items():
        # Statistics of the data, as after kerasbn.recalibrate: outputs of order 1.
        axes = tuple(range(terms.ndim - 1))
        exact_model.get_layer(f"{name}_bn").moving_mean.assign(terms.mean(axes))
        exact_model.get_layer(f"{name}_bn").moving_variance.assign(terms.var(axes))
    model = mixed_precision_model(policy)
    model.set_weights([w.astype("float32") for w in exact_model.get_weights()])
    exact = keras_outputs(exact_model, {k: v.astype("float64") for k, v in inputs.items()})
    predicted = keras_outputs(model, inputs)
    path = kerasbn.export_for_serving(model, tmp_path / "1")
    assert not graph_report(path)["ops"] & NORMALIZATION_OPS  # both were folded
    served = serve(path, inputs)
    for name, terms in producer_terms(exact_model, inputs, absolute=True).items():
        bn = exact_model.get_layer(f"{name}_bn")
        scale = np.abs(bn.gamma.numpy()) / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
        bound = 2 * unit_roundoff * (terms * scale).max()
        folded = served[f"{name}_bn"].astype("float64")
        unfolded = predicted[f"{name}_bn"].astype("float64")
        for label, difference in (
            ("folded vs predict", folded - unfolded),
            ("folded vs exact", folded - exact[f"{name}_bn"]),
            ("predict vs exact", unfolded - exact[f"{name}_bn"]),
        ):
            assert np.abs(difference).max() <= bound, (name, label, np.abs(difference).max(), bound)


# -- Keras' own exporter -----------------------------------------------------------


def test_keras_model_export_works_with_our_layers(tmp_path):
    """`model.export` traces inference, which never runs our XLA programs (the
    layers compile only recurring training shapes): the export carries no
    `_XlaMustCompile` even for `jit_compile=True` layers, with or without
    `kerasbn.kernels.jit_disabled()`, and loads and serves without kerasbn."""
    inputs = keras.Input((6, 6, 2), name="image")
    h = keras.layers.Conv2D(3, 3, name="conv")(inputs)
    h = kerasbn.BatchNorm(name="bn")(h)  # jit_compile=True by default
    outputs = keras.layers.Dense(2, name="scores")(keras.layers.Flatten()(h))
    model = randomize(keras.Model(inputs, outputs), seed=11)
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2)).astype("float32")
    expected = model.predict(x, verbose=0)

    roots = {"default": tmp_path / "keras_default", "plain": tmp_path / "keras_plain"}
    model.export(str(roots["default"] / "1"), verbose=False)
    with kerasbn.kernels.jit_disabled():
        model.export(str(roots["plain"] / "1"), verbose=False)
    for root in roots.values():
        report = graph_report(root / "1")
        assert report["xla"] == [] and report["unknown_ops"] == set()
        (root / "inputs").mkdir()
        np.save(root / "inputs" / "image.npy", x)

    loaded = load_in_fresh_process(list(roots.values()), tmp_path)
    assert len(loaded) == 4  # two exports, two loaders, one output each
    for key, value in loaded.items():
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5, err_msg=key)


# -- bad input ------------------------------------------------------------------------


def small_model():
    x = keras.Input((3,), name="x")
    return keras.Model(x, kerasbn.BatchNorm()(keras.layers.Dense(2)(x)))


def test_arguments_of_the_wrong_type_raise_type_error(tmp_path):
    model = small_model()
    with pytest.raises(TypeError, match="model"):
        kerasbn.export_for_serving("model.keras", tmp_path / "1")
    with pytest.raises(TypeError, match="export_dir"):
        kerasbn.export_for_serving(model, 1)
    for name in ("fold_batchnorm", "jit_compile", "overwrite"):
        with pytest.raises(TypeError, match=name):
            kerasbn.export_for_serving(model, tmp_path / "1", **{name: "yes"})
    with pytest.raises(ValueError, match="export_dir"):
        kerasbn.export_for_serving(model, "")
    assert list(tmp_path.iterdir()) == []


def test_unbuilt_model_and_model_without_inputs_raise_value_error(tmp_path):
    unbuilt = keras.Sequential([keras.layers.Dense(2), kerasbn.BatchNorm()])
    with pytest.raises(ValueError, match="not built"):
        kerasbn.export_for_serving(unbuilt, tmp_path / "1")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 3), "float32"))
    assert subclassed.built
    with pytest.raises(ValueError, match="no inputs"):
        kerasbn.export_for_serving(subclassed, tmp_path / "1")
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    model = randomize(small_model())
    target = tmp_path / "base" / "1"
    target.mkdir(parents=True)
    kerasbn.export_for_serving(model, target)  # empty: fine
    with pytest.raises(ExportDirExistsError, match="export_dir"):
        kerasbn.export_for_serving(model, target)
    with pytest.raises(FileExistsError):
        kerasbn.export_for_serving(model, target)
    with pytest.raises(ValueError, match="overwrite=True"):
        kerasbn.export_for_serving(model, target)
    (target / "stale.txt").write_text("old")
    kerasbn.export_for_serving(model, target, overwrite=True)
    assert not (target / "stale.txt").exists() and (target / "saved_model.pb").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["1"]  # nothing left aside
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ExportDirExistsError, match="not a directory"):
        kerasbn.export_for_serving(model, a_file, overwrite=True)


def test_unwritable_location_raises_permission_error(tmp_path):
    model = small_model()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    target = locked / "base" / "1"
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use sysfs if possible
            target = Path("/sys/kerasbn-export-test/base/1")
            try:
                os.mkdir(target.parent.parent)
            except PermissionError:
                pass
            else:
                os.rmdir(target.parent.parent)
                pytest.skip("no unwritable location available")
        with pytest.raises(PermissionError, match="export_dir"):
            kerasbn.export_for_serving(model, target)
    finally:
        locked.chmod(stat.S_IRWXU)
    assert not target.parent.exists()


def test_a_file_in_the_way_raises_naming_export_dir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="export_dir"):
        kerasbn.export_for_serving(small_model(), tmp_path / "file" / "1")


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    model = randomize(small_model())
    target = tmp_path / "base" / "2"

    def failing_save(obj, export_dir, **kwargs):
        Path(export_dir, "saved_model.pb").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        kerasbn.export_for_serving(model, target)
    assert list(tmp_path.iterdir()) == []  # not even the created parent `base`

    monkeypatch.undo()
    kerasbn.export_for_serving(model, target)
    before = (target / "saved_model.pb").read_bytes()
    monkeypatch.setattr(tf.saved_model, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        kerasbn.export_for_serving(model, target, overwrite=True)
    assert (target / "saved_model.pb").read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["2"]
