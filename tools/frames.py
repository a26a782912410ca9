"""The frames of our code on a `BatchNorm` training call, per route: `python -m tools.frames`.

Traces one training step (a `tf.function` under a gradient tape, 16×8×8×64 float32) on route
`inline_ops` (the policy's default for that size) and on `warmup_dispatch` (`min_elements=0`),
and prints the Python stack from `BatchNorm.call` to where the normalization computes its output
(`normalize.pre_activation`), file, line and function. docs/layout.md quotes the counts.
"""

import os
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn.kernels import normalize  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(kerasbn.__file__))
ROUTES = {"inline_ops": {}, "warmup_dispatch": {"min_elements": 0}}


def stack(**policy):
    """`[(file, line, function), ...]` of our code from `BatchNorm.call` to `pre_activation`'s caller."""
    seen = []
    original = normalize.pre_activation

    def recording(*args, **kwargs):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE)]
        root = os.path.dirname(PACKAGE)
        seen.append([(os.path.relpath(f.filename, root), f.lineno, f.name) for f in frames])
        return original(*args, **kwargs)

    layer = kerasbn.BatchNorm()
    x = tf.random.normal([16, 8, 8, 64])
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    normalize.pre_activation = recording
    try:
        with kerasbn.kernels.xla_policy(**policy):
            step.get_concrete_function(x)
    finally:
        normalize.pre_activation = original
    frames = seen[0]
    start = next(i for i, (path, _, name) in enumerate(frames) if name == "call" and "batch_norm" in path)
    return frames[start:]


def main():
    for route, policy in ROUTES.items():
        frames = stack(**policy)
        print(f"route {route}: {len(frames)} frames of kerasbn from BatchNorm.call")
        for path, line, name in frames:
            print(f"  {path}:{line} {name}")


if __name__ == "__main__":
    main()
