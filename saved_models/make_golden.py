"""Writes the golden SavedModels of `saved_models/golden/`.

Usage: python saved_models/make_golden.py [--out saved_models/golden]

Each golden is `golden/<name>/` with
  1/                  the SavedModel (TF Serving layout: version 1),
  inputs/<input>.npy  one array per signature input,
  expected/<output>.npy  what the Keras model itself (`model.predict`) gave.

The models are small, with weights and moving statistics drawn from fixed
seeds (nothing is trained), so this script is deterministic. Re-run it only on
purpose: the goldens stand for models already deployed, and
`tests/test_golden_savedmodels.py` checks that they still load and compute the
same outputs, and that a fresh export of the same model still matches them.
"""

import argparse
import os
import shutil

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

BATCH = 4
VERSION = "1"


def randomize_weights(model, seed):
    """Every weight from a seeded generator; variances in [0.5, 2]."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        if "variance" in variable.path:
            value = rng.uniform(0.5, 2.0, shape)
        elif "gamma" in variable.path:
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.5, shape)
        variable.assign(value.astype(variable.dtype))


def digits_cnn():
    """The demo's architecture: conv-BN-ReLU twice, pooling, softmax. All folded."""
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    h = kerasbn.BatchNorm(name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv2")(h)
    h = kerasbn.BatchNorm(name="bn2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def two_heads():
    """Two inputs, two outputs; Conv1D + Keras BN, Dense + ours, a BN as output."""
    signal = keras.Input((16, 3), name="signal")
    features = keras.Input((5,), name="features")
    h = keras.layers.Conv1D(6, 3, name="conv")(signal)
    h = keras.layers.BatchNormalization(name="keras_bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    g = keras.layers.Dense(8, name="dense")(features)
    g = kerasbn.BatchNorm(epsilon=1e-2, name="bn")(g)
    g = keras.layers.ReLU()(g)
    joined = keras.layers.Concatenate()([h, g])
    scores = keras.layers.Dense(4, name="scores")(joined)
    embedding = keras.layers.Dense(3, use_bias=False, name="project")(joined)
    embedding = kerasbn.BatchNorm(center=False, name="embedding")(embedding)
    return keras.Model([signal, features], [scores, embedding], name="two_heads")


def unfolded_blocks():
    """Exported without folding: batch norm kernels stay in the served graph."""
    return keras.Sequential(
        [
            keras.Input((6, 6, 2), name="pixels"),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            kerasbn.BatchNorm(name="bn"),
            keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise"),
            keras.layers.BatchNormalization(name="keras_bn"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="logits"),
        ],
        name="unfolded_blocks",
    )


# name: (builder, seed, fold_batchnorm)
GOLDENS = {
    "digits_cnn": (digits_cnn, 1, True),
    "two_heads": (two_heads, 2, True),
    "unfolded_blocks": (unfolded_blocks, 3, False),
}


def build(name):
    """The golden's Keras model with its weights, and its inputs `{name: array}`."""
    builder, seed, _ = GOLDENS[name]
    keras.utils.set_random_seed(seed)
    model = builder()
    randomize_weights(model, seed)
    rng = np.random.default_rng(seed + 100)
    inputs = {
        tensor.name: rng.uniform(-1.0, 1.0, (BATCH,) + tuple(tensor.shape[1:])).astype("float32")
        for tensor in model.inputs
    }
    return model, inputs


def expected_outputs(model, inputs):
    """`{output name: array}` from the Keras model itself."""
    arrays = [inputs[t.name] for t in model.inputs]
    outputs = model.predict(arrays[0] if len(arrays) == 1 else arrays, verbose=0)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    names = getattr(model, "output_names", None) or [
        t._keras_history[0].name for t in model.outputs
    ]
    return dict(zip(names, outputs))


def save_arrays(directory, arrays):
    os.makedirs(directory, exist_ok=True)
    for name, array in arrays.items():
        np.save(os.path.join(directory, f"{name}.npy"), array)


def write_golden(name, out):
    model, inputs = build(name)
    fold = GOLDENS[name][2]
    root = os.path.join(out, name)
    shutil.rmtree(root, ignore_errors=True)
    kerasbn.export_for_serving(model, os.path.join(root, VERSION), fold_batchnorm=fold)
    save_arrays(os.path.join(root, "inputs"), inputs)
    save_arrays(os.path.join(root, "expected"), expected_outputs(model, inputs))
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
    parser.add_argument("--out", default=default)
    args = parser.parse_args(argv)
    for name in GOLDENS:
        root = write_golden(name, args.out)
        size = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files
        )
        print(f"{root}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
