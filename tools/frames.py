"""The frames of our code on a `BatchNorm` training call, per route: `python -m tools.frames`.

Traces one training step (a `tf.function` under a gradient tape, 16×8×8×64 float32) on route
`inline_ops` (the policy's default for that size) and on `warmup_dispatch` (`min_elements=0`),
and prints the Python stack from `BatchNorm.call` to where the normalization computes its output
(`normalize.pre_activation`), file, line and function. docs/layout.md quotes the counts.
"""

import itertools
import os
import traceback

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn.kernels import normalize  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(kerasbn.__file__)) + os.sep
ROUTES = {"inline_ops": {}, "warmup_dispatch": {"min_elements": 0}}
_fresh = itertools.count()


def stack(**policy):
    """`(route, [(file, line, function), ...])`: the route of the training call and the stack of our
    code from `BatchNorm.call` to `pre_activation`'s caller. Each call uses an epsilon of its own,
    so the kernel's programs are traced afresh whatever ran before in the process."""
    seen = []
    original = normalize.pre_activation

    def recording(*args, **kwargs):
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE)]
        root = os.path.dirname(PACKAGE.rstrip(os.sep))
        seen.append([(os.path.relpath(f.filename, root), f.lineno, f.name) for f in frames])
        return original(*args, **kwargs)

    layer = kerasbn.BatchNorm(epsilon=1e-3 * (1 + next(_fresh) * 1e-6))
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
            routes = kerasbn.kernels.explain(layer, x).routes
            step.get_concrete_function(x)
    finally:
        normalize.pre_activation = original
    if not seen:
        raise RuntimeError("the training call traced no normalization")
    frames = seen[0]
    start = next(i for i, (path, _, name) in enumerate(frames) if name == "call" and "batch_norm" in path)
    return routes[0], frames[start:]


def main():
    for policy in ROUTES.values():
        route, frames = stack(**policy)
        print(f"route {route}: {len(frames)} frames of kerasbn from BatchNorm.call")
        for path, line, name in frames:
            print(f"  {path}:{line} {name}")


if __name__ == "__main__":
    main()
