"""The `make demo` program: a small CNN with kerasbn.BatchNorm on digits.

Run with `python -m kerasbn.demo [--epochs N] [--export-dir DIR]`. It trains on
scikit-learn's bundled 8x8 digits (nothing is downloaded), prints test
accuracy, compares one layer's learned moving statistics with the true
population statistics of that layer's inputs over the training set, and
exports the model for TF Serving to `--export-dir` (default
`saved_models/digits/1`, i.e. version 1 of the model `digits`; '' skips it).
"""

import argparse
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402


def load_digits_split(seed=0, test_fraction=0.25):
    """Digits as (N, 8, 8, 1) float32 in [0, 1], split into train and test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    labels = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(images))
    split = int(len(images) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return (images[train], labels[train]), (images[test], labels[test])


def build_model():
    """Conv -> BatchNorm -> ReLU twice, then a linear classifier.

    momentum=0.9 rather than Keras' default 0.99: with ~40 steps an epoch, the
    default's ~100-step memory would still lag the weights after a short run.
    """
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    h = kerasbn.BatchNorm(momentum=0.9, name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="conv2")(h)
    h = kerasbn.BatchNorm(momentum=0.9, name="bn2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def population_statistics(model, layer_name, images):
    """Exact per-channel mean and variance of a layer's inputs over `images`."""
    layer = model.get_layer(layer_name)
    probe = keras.Model(model.inputs, layer.input)
    activations = probe.predict(images, verbose=0).astype("float64")
    axes = tuple(range(activations.ndim - 1))
    return activations.mean(axis=axes), activations.var(axis=axes)


def print_statistics(layer, true_mean, true_var, channels=6):
    moving_mean = layer.moving_mean.numpy()
    moving_var = layer.moving_variance.numpy()
    print(f"\n{layer.name}: moving statistics vs the population statistics of its inputs")
    print(f"{'channel':>7} {'moving mean':>12} {'true mean':>10} {'moving var':>11} {'true var':>9}")
    for c in range(min(channels, len(moving_mean))):
        print(
            f"{c:>7} {moving_mean[c]:>12.4f} {true_mean[c]:>10.4f} "
            f"{moving_var[c]:>11.4f} {true_var[c]:>9.4f}"
        )
    print(
        f"max |moving - true| over {len(moving_mean)} channels: "
        f"mean {np.abs(moving_mean - true_mean).max():.4f}, "
        f"variance {np.abs(moving_var - true_var).max():.4f}"
    )


def serving_instructions(path, example):
    """How to serve the SavedModel at `path` (`base/<version>`) and query it."""
    base = os.path.dirname(path)
    name = os.path.basename(base) or "model"
    instances = json.dumps({"instances": example.tolist()}, separators=(",", ":"))
    return "\n".join(
        [
            f"Serve it with TF Serving (it loads the newest numbered version in {base}):",
            f'  docker run -p 8501:8501 -v "{base}:/models/{name}" -e MODEL_NAME={name} '
            "tensorflow/serving",
            "and ask for predictions (one 8x8x1 image per instance):",
            f"  curl -d '{instances}' localhost:8501/v1/models/{name}:predict",
            "Inspect its signature with:",
            f"  saved_model_cli show --dir {path} --tag_set serve --signature_def serving_default",
        ]
    )


def export(model, export_dir, example):
    """Exports `model` for serving to `export_dir` (replacing it); '' skips.

    Returns the absolute path written, or None when skipped.
    """
    if not export_dir:
        return None
    path = kerasbn.export_for_serving(model, export_dir, overwrite=True)
    print(f"\nexported the serving SavedModel (batch norms folded) to {path}")
    print(serving_instructions(path, np.round(np.asarray(example, "float64"), 4)))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--export-dir",
        default=os.path.join("saved_models", "digits", "1"),
        help="where to write the serving SavedModel ('' to skip)",
    )
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(args.seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=True,
    )
    model.summary()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_split=0.1,
        verbose=1,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"\ntest accuracy: {accuracy:.4f} on {len(x_test)} held-out digits")

    true_mean, true_var = population_statistics(model, "bn2", x_train)
    print_statistics(model.get_layer("bn2"), true_mean, true_var)
    export(model, args.export_dir, x_test[:1])
    return model, accuracy


if __name__ == "__main__":
    main()
