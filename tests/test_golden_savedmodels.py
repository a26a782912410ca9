"""The committed golden SavedModels still load and serve the stored outputs.

They stand for models already deployed: each is loaded in a fresh process where
`import kerasbn` fails, the three ways a server or a user would (the TF2
loader, the TF1 session loader with the signature's tensor names as TF Serving
does, and `saved_model_cli run`), and must give the outputs stored next to it,
which the Keras model itself computed when the golden was made. A fresh export
of the same model (rebuilt by `saved_models/make_golden.py`) must keep the same
signature and outputs, so that what we export today can replace them.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tensorflow.core.protobuf import saved_model_pb2

import kerasbn
from serving.isolation import load_in_fresh_process, saved_model_cli_run

SAVED_MODELS = Path(__file__).resolve().parent.parent / "saved_models"
GOLDEN = SAVED_MODELS / "golden"
NAMES = sorted(p.name for p in GOLDEN.iterdir() if (p / "1" / "saved_model.pb").exists())
RTOL = ATOL = 2e-5


def load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", SAVED_MODELS / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def arrays(directory):
    return {p.stem: np.load(p) for p in sorted(Path(directory).glob("*.npy"))}


def signature_of(saved_model):
    """`(inputs, outputs)`: `{name: (dtype enum, shape)}` read from saved_model.pb."""
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(saved_model) / "saved_model.pb").read_bytes())
    (meta_graph,) = proto.meta_graphs
    assert "serve" in meta_graph.meta_info_def.tags
    signature = meta_graph.signature_def["serving_default"]

    def describe(infos):
        return {
            name: (info.dtype, tuple(d.size for d in info.tensor_shape.dim))
            for name, info in infos.items()
        }

    return describe(signature.inputs), describe(signature.outputs)


def assert_matches_expected(outputs, expected, label):
    assert sorted(outputs) == sorted(expected), label
    for name, value in expected.items():
        assert outputs[name].shape == value.shape, (label, name)
        scale = max(1.0, float(np.abs(value).max()))
        np.testing.assert_allclose(
            outputs[name], value, rtol=RTOL, atol=ATOL * scale, err_msg=f"{label}/{name}"
        )


def test_goldens_are_present_small_and_complete():
    assert set(NAMES) == set(load_make_golden().GOLDENS)
    for name in NAMES:
        root = GOLDEN / name
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        assert size < 200_000, (name, size)
        inputs, outputs = signature_of(root / "1")
        assert sorted(arrays(root / "inputs")) == sorted(inputs)
        assert sorted(arrays(root / "expected")) == sorted(outputs)
        for _, shape in list(inputs.values()) + list(outputs.values()):
            assert shape[0] == -1  # batch dimension unknown


def test_goldens_load_without_kerasbn_via_tf2_and_session_loaders(tmp_path):
    loaded = load_in_fresh_process([GOLDEN / name for name in NAMES], tmp_path)
    for name in NAMES:
        expected = arrays(GOLDEN / name / "expected")
        for method in ("tf2", "session"):
            prefix = f"{name}/{method}/"
            outputs = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
            assert_matches_expected(outputs, expected, f"{name} {method}")


@pytest.mark.parametrize("name", NAMES)
def test_goldens_run_with_saved_model_cli(name, tmp_path):
    inputs = {p.stem: p for p in sorted((GOLDEN / name / "inputs").glob("*.npy"))}
    outputs = saved_model_cli_run(GOLDEN / name / "1", inputs, tmp_path)
    assert_matches_expected(outputs, arrays(GOLDEN / name / "expected"), f"{name} cli")


@pytest.mark.parametrize("name", NAMES)
def test_fresh_export_keeps_the_golden_signature_and_outputs(name, tmp_path):
    import tensorflow as tf

    make_golden = load_make_golden()
    model, inputs = make_golden.build(name)
    golden_inputs = arrays(GOLDEN / name / "inputs")
    for key, value in golden_inputs.items():
        np.testing.assert_array_equal(inputs[key], value)  # the generator is deterministic
    expected = arrays(GOLDEN / name / "expected")
    assert_matches_expected(make_golden.expected_outputs(model, inputs), expected, "keras")

    fold = make_golden.GOLDENS[name][2]
    path = kerasbn.export_for_serving(model, tmp_path / "1", fold_batchnorm=fold)
    assert signature_of(path) == signature_of(GOLDEN / name / "1")
    served = tf.saved_model.load(path).signatures["serving_default"]
    outputs = served(**{k: tf.constant(v) for k, v in inputs.items()})
    assert_matches_expected({k: v.numpy() for k, v in outputs.items()}, expected, "fresh")
