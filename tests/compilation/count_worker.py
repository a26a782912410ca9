"""Counts XLA compilations while our layers run, phase by phase.

Usage: python count_worker.py DUMP_DIR OUTPUT.json

Run with `XLA_FLAGS=--xla_dump_to=DUMP_DIR --xla_dump_hlo_as_text`: XLA then
writes one `*.before_optimizations.txt` file per program it compiles, which is
what is counted (compilations, not traces). Each phase's count is the number of
new files since the previous phase. Phases use the warm-up policy set below;
the first ones let every size compile (`min_elements=0`: their inputs are
small), the last ones check the size threshold.
"""

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn import kernels  # noqa: E402

# The policy counted here is our XLA programs'. With oneDNN on, a BatchNorm on
# float32 NHWC of at least 96 Ki elements runs TensorFlow's fused op instead
# and compiles nothing (tests/test_fused_training.py): the worker takes the
# oneDNN-off path (the policy's platform).
kernels.set_xla_policy(platform="cpu")

WARMUP = 3


def compiled_programs(dump):
    return len(list(Path(dump).glob("*before_optimizations.txt")))


def model_with(norm, channels=4):
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(inputs)
    h = norm()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def main(dump, output):
    rng = np.random.default_rng(0)
    counts = {}
    last = compiled_programs(dump)

    def phase(name):
        nonlocal last
        now = compiled_programs(dump)
        counts[name] = now - last
        last = now

    norms = {
        "BatchNorm": lambda: kerasbn.BatchNorm(),
        "BatchRenorm": lambda: kerasbn.BatchRenorm(),
        "GroupNorm": lambda: kerasbn.GroupNorm(groups=2),
        "GhostBatchNorm": lambda: kerasbn.BatchNorm(virtual_batch_size=4),
    }
    kernels.set_xla_policy(warmup_calls=WARMUP, max_shapes=2, min_elements=0)
    for kind, norm in norms.items():
        model = model_with(norm)
        model.compile(optimizer="sgd", loss="mse")
        model.predict(rng.normal(size=(4, 6, 6, 3)), verbose=0)  # Keras' own first compile
        phase(f"{kind}: setup")
        for batch in range(1, 9):  # inference at new batch sizes, three ways
            x = rng.normal(size=(batch, 6, 6, 3)).astype("float32")
            model.predict(x, verbose=0)
            model(x)
            model(x, training=False)
        phase(f"{kind}: inference at 8 batch sizes")
        x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
        y = rng.normal(size=(16, 2)).astype("float32")
        for _ in range(WARMUP):
            model.train_on_batch(x, y)
        phase(f"{kind}: {WARMUP} training steps at one shape")
        model.train_on_batch(x, y)
        model.train_on_batch(x, y)
        phase(f"{kind}: 2 more training steps at that shape")
        model.train_on_batch(x[:5], y[:5])
        phase(f"{kind}: one training step at a new shape")
    # The limit: with max_shapes=2, a third recurring shape is not compiled.
    model = model_with(norms["BatchNorm"], channels=6)
    model.compile(optimizer="sgd", loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (8, 7, 6):
            x = rng.normal(size=(batch, 6, 6, 3)).astype("float32")
            y = rng.normal(size=(batch, 2)).astype("float32")
            for _ in range(WARMUP + 2):
                model.train_on_batch(x, y)
            phase(f"limit: recurring shape {batch}")
    counts["limit warnings"] = sum("XLA-compiled for 2 input shapes" in str(w.message) for w in caught)
    # fit with a partial last batch, default policy (50 warm-up calls): no compilation.
    kernels.set_xla_policy(warmup_calls=kernels.Policy().warmup_calls)
    model = model_with(norms["GroupNorm"], channels=8)
    model.compile(optimizer="sgd", loss="mse")
    x = rng.normal(size=(70, 6, 6, 3)).astype("float32")
    y = rng.normal(size=(70, 2)).astype("float32")
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    phase("fit: 2 epochs of 5 steps, partial last batch")
    size_threshold_phases(rng, phase)
    Path(output).write_text(json.dumps(counts))


def size_threshold_phases(rng, phase):
    """Default `min_elements`, no warm-up: small inputs never compile, large ones do."""
    kernels.set_xla_policy(warmup_calls=0, min_elements=kernels.Policy().min_elements)
    for channels, name in ((4, "small"), (2048, "large")):  # 16x6x6x4 and 16x6x6x2048 elements
        model = model_with(lambda: kerasbn.BatchNorm(), channels=channels)
        model.compile(optimizer="sgd", loss="mse")
        x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
        y = rng.normal(size=(16, 2)).astype("float32")
        for _ in range(3):
            model.train_on_batch(x, y)
        phase(f"threshold: 3 training steps, {name} input, shape known while tracing")
    # A step traced for any batch size: the shape is seen only at run time.
    layer = kerasbn.BatchNorm()
    layer.build((None, 6, 6, 4))

    @tf.function(input_signature=[tf.TensorSpec((None, 6, 6, 4), tf.float32)])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(tf.reduce_sum(y * y), x)

    for batch in (16, 16, 16, 5, 5):
        step(rng.normal(size=(batch, 6, 6, 4)).astype("float32"))
    phase("threshold: 5 training steps, small input, shape seen at run time")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
