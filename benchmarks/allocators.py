"""TensorFlow's default CPU allocator against its BFC allocator, on training steps.

    python -m benchmarks.allocators [--processes 3] [--layers ours_bn,fused_bn]

TensorFlow's default CPU allocator gives large buffers back to the OS when they
are freed, so every step page-faults them in again; the BFC allocator
(`TF_CPU_ALLOCATOR_USE_BFC=true`, or on with oneDNN) keeps them. The allocator
is chosen when TensorFlow starts, so every measurement is a fresh process, and
the two settings alternate (default, BFC, BFC, default, ...) so that background
load hits both alike. Each process times the training steps of
`benchmarks.cases` on the target shape, interleaved (`benchmarks.timing`); the
table gives, per layer and setting, the median over processes of each
process's median step time. oneDNN is off unless `TF_ENABLE_ONEDNN_OPTS` is
set (with oneDNN on, TensorFlow uses BFC either way).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LAYERS = ("ours_bn", "ours_bn_jit", "fused_bn", "ours_gn", "keras_gn_jit")
SETTINGS = {"default": "false", "BFC": "true"}


def time_here(keys):
    """`{key: median seconds}` of the training steps in this process."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from benchmarks import cases as C
    from benchmarks.timing import Case, measure

    shape = C.TARGET_SHAPE
    x = C.make_input(shape)
    cases = {}
    for key in keys:
        spec = C.LAYERS_BY_KEY[key]
        step = C.training_step(C.build_layer(spec, shape), spec.step_jit)
        cases[key] = Case(spec.title, lambda f=step: f(x))
    measure(list(cases.values()), warmup=2, rounds=5, calls_per_round=3)
    return {key: case.median for key, case in cases.items()}


def run(keys, processes):
    """`{setting: {key: [median per process]}}`, the settings alternating."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN would force BFC on both sides
    samples = {setting: {key: [] for key in keys} for setting in SETTINGS}
    order = list(SETTINGS)
    for index in range(processes):
        for setting in order if index % 2 == 0 else order[::-1]:
            env["TF_CPU_ALLOCATOR_USE_BFC"] = SETTINGS[setting]
            command = [sys.executable, "-m", "benchmarks.allocators", "--here", ",".join(keys)]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
            line = [text for text in done.stdout.splitlines() if text.startswith("{")][-1]
            for key, seconds in json.loads(line).items():
                samples[setting][key].append(seconds)
            print(f"process {index + 1}/{processes}, {setting}: done", file=sys.stderr, flush=True)
    return samples


def table(samples, keys):
    from benchmarks import cases as C

    lines = [
        f"| training step, {C.TARGET_SHAPE.label} | default allocator | BFC allocator | default ÷ BFC |",
        "|---|---|---|---|",
    ]
    for key in keys:
        default = statistics.median(samples["default"][key])
        bfc = statistics.median(samples["BFC"][key])
        title = C.LAYERS_BY_KEY[key].title
        lines.append(f"| {title} | {default * 1e3:.1f} ms | {bfc * 1e3:.1f} ms | {default / bfc:.2f}× |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="processes per setting")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="layer keys")
    parser.add_argument("--here", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.here:
        print(json.dumps(time_here(args.here.split(","))))
        return 0
    keys = args.layers.split(",")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # before TensorFlow starts, as in `run`
    samples = run(keys, args.processes)
    from benchmarks import platform_info

    flags = " ".join(platform_info.cpu_flags() or ["flags unknown"])
    print(
        f"Machine: {platform_info.cpu_model()}, {os.cpu_count()} cores ({flags}); "
        f"{platform_info.onednn_description()}; {args.processes} processes per allocator."
    )
    print("\n".join(table(samples, keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
