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


def test_conversion_recipe_gives_the_same_model_with_our_layers(rng):
    namespace = {"keras": keras, "kerasbn": kerasbn}
    exec(block_containing("def convert(model)"), namespace)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4)(h)
    original = keras.Model(inputs, keras.layers.Flatten()(h))
    x = rng.normal(size=(16, 6, 6, 2)).astype("float32")
    original(x, training=True)  # move the moving statistics away from their initial values
    converted = namespace["convert"](original)
    bn = converted.layers[2]
    assert isinstance(bn, kerasbn.BatchNorm)
    assert bn.momentum == 0.9 and bn.epsilon == 1e-4
    np.testing.assert_allclose(converted(x), original(x), atol=1e-5)
    np.testing.assert_allclose(converted(x, training=True), original(x, training=True), atol=1e-5)


def test_renorm_schedule_example_gives_the_papers_schedule():
    namespace = {"keras": keras, "kerasbn": kerasbn}
    exec(block_containing("paper_renorm_clipping()"), namespace)
    layer = namespace["layer"]
    assert isinstance(layer, kerasbn.BatchRenorm)
    assert [float(layer.r_max(s)) for s in (5000, 40000)] == [1.0, 3.0]
    assert [float(layer.d_max(s)) for s in (5000, 25000)] == [0.0, 5.0]


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
