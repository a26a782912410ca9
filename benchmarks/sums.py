"""The sums the kernels reduce with, against a copy of `x`: `python -m benchmarks.sums`.

Times `moments.sum_over` (one tensor, `(x - m)²`) and `moments.sum_pair` (two tensors, `x` and
`x (x - m)`) per channel (batch norm) and per sample and channel (group norm) on 64×56×56×64
float32, for several first-stage block sizes, each jit-compiled alone, side by side with a
jit-compiled copy of `x` in one process (`benchmarks.timing`). Also the per-sample sum with the
ones of its second stage broadcast in the product, the form decision 024 replaced, and the sum
of `x` itself in blocks and as one product with ones (`stored`, decision 025), and TensorFlow's
fused batch norm forward and backward (decision 027). Prints a markdown table: median ms and ×
copy. docs/decisions/024-group-norm-on-the-input-layout.md, 025, 027.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from benchmarks import cases as C  # noqa: E402
from benchmarks import platform_info  # noqa: E402
from benchmarks.timing import Case, measure  # noqa: E402
from kerasbn.kernels.build import Build  # noqa: E402
from kerasbn.kernels.moments import sum_over, sum_pair  # noqa: E402

BLOCKS = (4, 8, 16)
LAYOUTS = {"per channel": (0, 1, 2), "per sample and channel": (1, 2)}


def broadcast_ones_sum(values, block):
    """The per-sample sum as before decision 024: blocks, then ones `[2, blocks]` broadcast
    against the `[N, blocks, C]` partial sums in one product."""
    n, h, w, c = values.shape
    partial = tf.reduce_sum(tf.reshape(values, [n, h * w // block, block, c]), axis=2)
    ones = tf.concat([tf.ones([1, h * w // block]), tf.zeros([1, h * w // block])], 0)
    return tf.matmul(ones, partial)[:, 0, :]


def cases(x):
    """`{name: zero-argument callable}`: the copy floor first."""
    mean = tf.reduce_mean(x, axis=(0, 1, 2), keepdims=True)
    jit = lambda f: tf.function(f, jit_compile=True)  # noqa: E731
    found = {"copy of x (floor)": jit(lambda x: x + 0.0)}
    for layout, axes in LAYOUTS.items():
        for block in BLOCKS:
            build = Build(for_xla=True, block_sums=True, block=block, two_input_block=block)
            found[f"sum, {layout}, block {block}"] = jit(
                lambda x, a=axes, b=build: sum_over(tf.square(x - mean), a, b)
            )
            found[f"pair sum, {layout}, block {block}"] = jit(
                lambda x, a=axes, b=build: sum_pair(x, x * (x - mean), a, b)
            )
    for layout, axes in LAYOUTS.items():
        build = Build(for_xla=True, block_sums=True)
        found[f"sum of x, {layout}, blocks of {build.block}"] = jit(lambda x, a=axes, b=build: sum_over(x, a, b))
        found[f"sum of x, {layout}, stored (one product)"] = jit(
            lambda x, a=axes, b=build: sum_over(x, a, b, stored=True)
        )
    found["sum, per sample and channel, block 16, ones broadcast"] = jit(
        lambda x: broadcast_ones_sum(tf.square(x - mean), 16)
    )
    calls = {name: (lambda f=f: f(x)) for name, f in found.items()}
    calls.update(fused_batch_norm_passes(x))
    return calls


def fused_batch_norm_passes(x):
    """TensorFlow's fused batch norm (oneDNN's kernel when oneDNN is on) in training mode, forward
    and backward alone, each in a plain `tf.function`: what a pass costs in the best hand-written
    kernel at hand (docs/decisions/027-what-bounds-issue-25s-open-targets.md)."""
    channels = x.shape[-1]
    scale, offset, empty = tf.ones([channels]), tf.zeros([channels]), tf.zeros([0])

    @tf.function
    def forward(x):
        return tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=1e-3, is_training=True
        )[:3]

    saved = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=1e-3, is_training=True
    )
    dy = x * 0.5

    @tf.function
    def backward(x):
        return tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=scale, reserve_space_1=saved[3], reserve_space_2=saved[4],
            reserve_space_3=saved[5], epsilon=1e-3, is_training=True,
        )[:3]

    return {
        "fused batch norm, training forward (reads x 2-3×, writes y)": lambda: forward(x),
        "fused batch norm, backward (reads dy and x 2×, writes dx)": lambda: backward(x),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    x = C.make_input(C.TARGET_SHAPE)
    timed = [Case(name, fn) for name, fn in cases(x).items()]
    measure(timed, warmup=2, rounds=args.rounds, calls_per_round=5)
    floor = timed[0].median
    print(f"Machine: {platform_info.describe()}; TensorFlow {tf.__version__}.\n")
    print("| sum on 64×56×56×64 float32 | median ms | × copy |\n|---|---|---|")
    for case in timed:
        print(f"| {case.name} | {case.median * 1e3:.2f} | {case.median / floor:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
