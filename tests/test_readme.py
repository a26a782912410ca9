"""The README's code examples run and do what the README says."""

import re
from pathlib import Path

import keras
import numpy as np

import kerasbn

README = (Path(__file__).parent.parent / "README.md").read_text()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def block_containing(marker):
    (block,) = [b for b in python_blocks() if marker in b]
    return block


def test_quickstart_builds_a_model_with_our_layer():
    namespace = {}
    exec(block_containing("import kerasbn"), namespace)
    model = namespace["model"]
    assert any(isinstance(layer, kerasbn.BatchNorm) for layer in model.layers)
    assert model.output.shape == (None, 10)


def test_conversion_example_converts_fuses_and_goes_back_to_keras(rng):
    namespace = {"keras": keras, "kerasbn": kerasbn}
    exec(block_containing("kerasbn.convert(model"), namespace)
    model, fast, plain = namespace["model"], namespace["fast"], namespace["plain"]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in fast.layers)
    assert not any(isinstance(layer, keras.layers.ReLU) for layer in fast.layers)  # all fused
    fused = [layer for layer in fast.layers if isinstance(layer, kerasbn.BatchNorm)]
    assert {layer.activation for layer in fused} == {"relu6", None}
    relu6 = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert len(fast.layers) == len(model.layers) - len(relu6)
    # Our layers' outputs against Keras' are tested on this model in
    # test_conversion_applications.py; here, Keras' layers again, same outputs.
    assert not any(isinstance(layer, (kerasbn.BatchNorm, kerasbn.GroupNorm)) for layer in plain.layers)
    assert len(plain.layers) == len(model.layers)
    x = rng.normal(size=(2, 96, 96, 3)).astype("float32")
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_renorm_schedule_example_gives_the_papers_schedule():
    namespace = {"keras": keras, "kerasbn": kerasbn}
    exec(block_containing("paper_renorm_clipping()"), namespace)
    layer = namespace["layer"]
    assert isinstance(layer, kerasbn.BatchRenorm)
    assert [float(layer.r_max(s)) for s in (5000, 40000)] == [1.0, 3.0]
    assert [float(layer.d_max(s)) for s in (5000, 25000)] == [0.0, 5.0]


DOC = (Path(__file__).parent.parent / "docs" / "conversion.md").read_text()


def test_conversion_doc_examples_run_in_order_and_print_what_they_claim(capsys):
    """Executes every block of docs/conversion.md in one namespace, as a reader would."""
    namespace = {}
    for block in re.findall(r"```python\n(.*?)```", DOC, flags=re.S):
        exec(block, namespace)
    printed = capsys.readouterr().out.splitlines()
    claimed = [
        line.split("# ", 1)[1]
        for block in re.findall(r"```python\n(.*?)```", DOC, flags=re.S)
        for line in block.splitlines()
        if line.startswith("print(") and "# " in line
    ]
    for claim in claimed:
        assert claim in printed
    model, converted = namespace["model"], namespace["converted"]
    assert [type(layer).__name__ for layer in converted.layers] == [
        "InputLayer", "Conv2D", "BatchNorm", "ReLU", "Conv2D", "BatchNorm", "Activation",
        "GlobalAveragePooling2D", "Dense",
    ]
    assert converted.get_layer("bn2").momentum == 0.9
    backbone = namespace["converted_classifier"].layers[1]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers)
    assert isinstance(namespace["renormalized"].get_layer("bn1"), kerasbn.BatchRenorm)
    assert namespace["renormalized"].get_layer("bn1").r_max == 2.0
    assert [type(layer).__name__ for layer in namespace["plain"].layers] == [
        "InputLayer", "Conv2D", "BatchNormalization", "Activation", "Conv2D", "BatchNormalization",
        "Activation", "GlobalAveragePooling2D", "Dense",
    ]
    assert model.get_layer("bn1").__class__ is keras.layers.BatchNormalization  # left alone


def test_ghost_batch_norm_example_normalizes_each_ghost_batch(rng):
    namespace = {"keras": keras, "kerasbn": kerasbn}
    exec(block_containing("virtual_batch_size=16"), namespace)
    model = namespace["model"]
    (layer,) = [layer for layer in model.layers if isinstance(layer, kerasbn.BatchNorm)]
    assert layer.virtual_batch_size == 16 and layer.activation == "relu"
    conv = model.layers[model.layers.index(layer) - 1]
    probe = keras.Model(model.inputs, [conv.output, layer.output])
    # 40 examples: ghost batches of 16, 16 and 8, each with its own statistics.
    features, normalized = probe(rng.normal(size=(40, 32, 32, 3)).astype("float32"), training=True)
    features = features.numpy().astype(np.float64)
    for part in (slice(0, 16), slice(16, 32), slice(32, 40)):
        block = features[part]
        mean, var = block.mean(axis=(0, 1, 2)), block.var(axis=(0, 1, 2))
        expected = np.maximum((block - mean) / np.sqrt(var + 1e-3), 0.0)
        np.testing.assert_allclose(normalized.numpy()[part], expected, atol=1e-4)
