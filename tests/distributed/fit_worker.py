"""Trains a small model with synchronized BatchNorm under MirroredStrategy.

Usage: python fit_worker.py INPUT.npz OUTPUT.npz

INPUT holds `x`, `y` and `weights` (the initial model weights, flattened in
`model.get_weights()` order as weights_0, weights_1, ...). The model is
`build_model()` below; it is trained for one epoch with SGD on global batches of
16 (8 per replica) without shuffling. OUTPUT gets the final weights.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16


def build_model(norm):
    import keras

    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    h = norm()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def train(model, x, y):
    import keras

    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def main(input_path, output_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    import kerasbn

    data = np.load(input_path)
    initial = [data[f"weights_{i}"] for i in range(len([k for k in data if k.startswith("weights_")]))]
    with strategy.scope():
        model = build_model(lambda: kerasbn.BatchNorm(synchronized=True, momentum=0.8))
        model.set_weights(initial)
    final = train(model, data["x"], data["y"])
    np.savez(output_path, **{f"weights_{i}": w for i, w in enumerate(final)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
