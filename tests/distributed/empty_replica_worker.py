"""Trains models under MirroredStrategy on a data set whose last batch leaves a
replica empty, and saves what they learned.

Usage: python empty_replica_worker.py INPUT.npz OUTPUT.npz

INPUT holds `x`, `y` and `kinds` (names of `PAIRS`) and, per kind, the initial
weights as `<kind>/<index>`, which our layer's model and Keras' share. 33
samples in global batches of 16 over two replicas: the last batch has one
sample, so one replica gets none. Each model is trained for one epoch without
shuffling; OUTPUT gets the final weights as `<kind>/ours/<index>` and
`<kind>/keras/<index>`.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH = 16


def pairs():
    """Kind -> (our normalization layer, Keras' same layer), as functions."""
    import keras

    import kerasbn

    return {
        "group_norm": (
            lambda: kerasbn.GroupNorm(groups=2),
            lambda: keras.layers.GroupNormalization(groups=2),
        ),
        "synchronized_batch_norm": (
            lambda: kerasbn.BatchNorm(synchronized=True),
            lambda: keras.layers.BatchNormalization(synchronized=True),
        ),
    }


def build_model(norm):
    """Dense, norm, ReLU, pooling, Dense on 5x5x2 inputs.

    The first layer is a per-position Dense rather than a Conv2D: with oneDNN
    on (TF_ENABLE_ONEDNN_OPTS=1), TensorFlow 2.21's Conv2D returns its input's
    shape for an empty batch ((0, 5, 5, 2) instead of (0, 5, 5, 4)), which
    breaks every model after it, Keras' own layers included.
    """
    import keras

    inputs = keras.Input((5, 5, 2))
    h = keras.layers.Dense(4, use_bias=False)(inputs)
    h = norm()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def train(model, x, y):
    import keras

    # fit(jit_compile=True) cannot run collectives on CPU (see docs/synchronized.md).
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def main(input_path, output_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    data = np.load(input_path)
    results = {}
    for kind in data["kinds"]:
        for owner, norm in zip(("ours", "keras"), pairs()[str(kind)]):
            with strategy.scope():
                model = build_model(norm)
                count = len(model.get_weights())
                model.set_weights([data[f"{kind}/{i}"] for i in range(count)])
            for index, value in enumerate(train(model, data["x"], data["y"])):
                results[f"{kind}/{owner}/{index}"] = value
    np.savez(output_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
