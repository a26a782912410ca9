"""`make bench`: time our layers against their anchors, side by side, in one process.

    python -m benchmarks.run            # full run, writes benchmarks/results.md
    python -m benchmarks.run --quick    # tiny shapes, a few seconds per shape

For every shape, all training steps and inference passes (ours, the anchors and
the floors) are compiled, warmed up and then timed in interleaved rounds (see
`benchmarks.timing`); the tables report medians and ratios of medians from the
same run. Peak memory of a training step is measured in a fresh subprocess per
layer, so one layer's cached buffers cannot hide another's, with TensorFlow's
allocator statistics where its BFC allocator is in use and the resident set
size otherwise (see `benchmarks.peak_memory`).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Every case wraps the same Python step function in a new `tf.function`; TF's
# "triggered tf.function retracing" warning counts those first traces.
tf.get_logger().setLevel("ERROR")

from benchmarks import cases as C  # noqa: E402
from benchmarks import peak_memory, platform_info, report  # noqa: E402
from benchmarks.timing import Case, measure  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results.md")

# Layers whose training-step peak memory is measured (one subprocess each).
MEMORY_KEYS = ("ours_bn", "ours_bn_jit", "ours_brn", "ours_gn", "fused_bn", "keras_bn_jit", "keras_gn_jit")
QUICK_MEMORY_KEYS = ("ours_bn", "fused_bn")

# Ghost batch norm against our batch norm on the same total batch.
GHOST_PAIRS = (("ours_gbn", "ours_bn"), ("ours_gbn_jit", "ours_bn_jit"))

COPY = "copy of x (floor)"
AFFINE = "jit x·scale+shift (floor)"


def available_specs():
    """Layer specs whose layer exists (BatchRenorm and GroupNorm may not yet)."""
    names = {"ours_brn": "BatchRenorm", "ours_brn_jit": "BatchRenorm"}
    names.update({"ours_gn": "GroupNorm", "ours_gn_jit": "GroupNorm"})
    return [spec for spec in C.LAYERS if spec.key not in names or C.available(names[spec.key])]


# -- timing ---------------------------------------------------------------------


def time_shape(shape, specs, *, rounds, calls_per_round, warmup):
    """Medians and first-call times for every case of one shape.

    Returns `{("train" | "infer", name): Case}` with names being layer keys or
    the floors `COPY` and `AFFINE`.
    """
    x = C.make_input(shape)
    cases = {}
    for spec in specs:
        train_layer = C.build_layer(spec, shape)
        infer_layer = C.build_layer(spec, shape)
        train = C.training_step(train_layer, spec.step_jit)
        infer = C.inference_step(infer_layer, spec.step_jit)
        cases[("train", spec.key)] = Case(spec.title, lambda f=train: f(x))
        cases[("infer", spec.key)] = Case(spec.title, lambda f=infer: f(x))
    copy, affine = C.copy_step(), C.affine_step(shape)
    cases[("train", COPY)] = Case(COPY, lambda: copy(x))
    cases[("infer", COPY)] = cases[("train", COPY)]
    cases[("infer", AFFINE)] = Case(AFFINE, lambda: affine(x))
    unique = list({id(case): case for case in cases.values()}.values())
    measure(unique, warmup=warmup, rounds=rounds, calls_per_round=calls_per_round)
    return cases


# -- peak memory ------------------------------------------------------------------


def measure_memory_here(key, shape):
    """Peak bytes of one training step over what was resident before it.

    Runs in the current process, which should be fresh: compiles and warms up
    the step, then measures further steps (see `benchmarks.peak_memory`).
    """
    spec = C.LAYERS_BY_KEY[key]
    x = C.make_input(shape)
    layer = C.build_layer(spec, shape)
    step = C.training_step(layer, spec.step_jit)
    for _ in range(2):
        tf.nest.map_structure(lambda t: t.numpy(), step(x))
    peak, method = peak_memory.peak_over_resident(lambda: step(x))
    return {"key": key, "peak_bytes": peak, "input_bytes": x.numpy().nbytes, "method": method}


def measure_memory(keys, shape, parallel=2):
    """Runs `measure_memory_here` for each key in its own subprocess, `parallel` at a time."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env = peak_memory.subprocess_environment(env)
    dims = "x".join(str(d) for d in shape.shape)
    results = {}
    keys = list(keys)
    for start in range(0, len(keys), parallel):
        running = {}
        for key in keys[start : start + parallel]:
            command = [sys.executable, "-m", "benchmarks.run", "--memory-case", key]
            command += ["--memory-shape", dims, "--memory-axis", str(shape.axis)]
            running[key] = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        for key, process in running.items():
            stdout, stderr = process.communicate()
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            if process.returncode != 0 or not lines:
                results[key] = {"error": (stderr.strip().splitlines() or ["failed"])[-1]}
            else:
                results[key] = json.loads(lines[-1])
    return {key: results[key] for key in keys}


# -- tables -----------------------------------------------------------------------


def ms(seconds):
    return f"{seconds * 1e3:.2f}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def ratio(value):
    return f"{value:.2f}×"


def times_table(results, shapes, specs, kind, floor):
    """Rows are layers, columns shapes; cells 'median ms (× floor)'."""
    header = "| " + ("training step" if kind == "train" else "inference") + " | "
    header += " | ".join(shape.label for shape in shapes) + " |"
    lines = [header, "|---" * (len(shapes) + 1) + "|"]
    floors = [COPY] if kind == "train" else [COPY, AFFINE]
    for name in floors + [spec.key for spec in specs]:
        title = name if name in (COPY, AFFINE) else C.LAYERS_BY_KEY[name].title
        cells = []
        for shape in shapes:
            case = results[shape].get((kind, name))
            if case is None:
                cells.append("n/a")
                continue
            base = results[shape][(kind, floor)].median
            cells.append(f"{ms(case.median)} ms ({ratio(case.median / base)})")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines


def comparisons(specs):
    """(ours key, anchor key) pairs: each of our layers against each anchor of its family."""
    keys = {spec.key for spec in specs}
    pairs = []
    for ours in specs:
        if not ours.ours:
            continue
        for anchor in specs:
            if not anchor.ours and anchor.family == ours.family:
                pairs.append((ours.key, anchor.key))
    for brn, bn in (("ours_brn", "ours_bn"), ("ours_brn_jit", "ours_bn_jit")):
        if brn in keys:
            pairs.append((brn, bn))
    pairs += [(ghost, bn) for ghost, bn in GHOST_PAIRS if ghost in keys and bn in keys]
    return pairs


def ratio_table(results, shapes, specs, kind):
    """Speed-ups `anchor time / our time` (above 1: ours is faster)."""
    header = "| speed-up (anchor ÷ ours), " + ("training" if kind == "train" else "inference")
    header += " | " + " | ".join(shape.label for shape in shapes) + " |"
    lines = [header, "|---" * (len(shapes) + 1) + "|"]
    for ours, anchor in comparisons(specs):
        label = f"{C.LAYERS_BY_KEY[anchor].title} ÷ {C.LAYERS_BY_KEY[ours].title}"
        cells = []
        for shape in shapes:
            mine = results[shape].get((kind, ours))
            theirs = results[shape].get((kind, anchor))
            cells.append(ratio(theirs.median / mine.median) if mine and theirs else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def compile_table(results, shapes, specs):
    """First call minus a steady-state call, training step / inference, seconds."""
    header = "| first call − steady call (s), train / infer | "
    header += " | ".join(shape.label for shape in shapes) + " |"
    lines = [header, "|---" * (len(shapes) + 1) + "|"]
    for spec in specs:
        cells = []
        for shape in shapes:
            train = results[shape][("train", spec.key)].compile_time
            infer = results[shape][("infer", spec.key)].compile_time
            cells.append(f"{train:.2f} / {infer:.2f}")
        lines.append(f"| {spec.title} | " + " | ".join(cells) + " |")
    return lines


def memory_table(memory, shape):
    lines = [
        f"| training-step peak memory, {shape.label} | MiB over resident | × input size | ÷ fused |",
        "|---|---|---|---|",
    ]
    fused = memory.get("fused_bn", {}).get("peak_bytes")
    for key, value in memory.items():
        title = C.LAYERS_BY_KEY[key].title
        if "error" in value:
            lines.append(f"| {title} | error: {value['error'][:80]} | | |")
            continue
        peak = value["peak_bytes"]
        vs_fused = ratio(peak / fused) if fused else "n/a"
        lines.append(
            f"| {title} | {peak / 2**20:.1f} | {peak / value['input_bytes']:.2f} | {vs_fused} |"
        )
    return lines


def target_lines(results, memory, shape):
    """The issue's targets on `shape`, each with its measured value and verdict."""
    r = results.get(shape)
    if r is None:
        return ["(targets are stated on " + shape.label + ", not measured in this run)"]

    def t(kind, key):
        case = r.get((kind, key))
        return case.median if case else None

    lines = []

    def check(text, value, goal, higher_is_better=True):
        if value is None:
            lines.append(f"- {text}: not measured")
            return
        met = value >= goal if higher_is_better else value <= goal
        sign = "≥" if higher_is_better else "≤"
        verdict = "met" if met else "NOT met"
        lines.append(f"- {text}: {value:.2f}× (target {sign} {goal}×) — **{verdict}**")

    def speedup(anchor, ours, kind="train"):
        a, o = t(kind, anchor), t(kind, ours)
        return None if a is None or o is None else a / o

    def slowdown(ours, base, kind="train"):
        a, b = t(kind, ours), t(kind, base)
        return None if a is None or b is None else a / b

    for ours in ("ours_bn", "ours_bn_jit"):
        title = C.LAYERS_BY_KEY[ours].title
        check(f"{title} training vs tf_keras fused BN", speedup("fused_bn", ours), 1.3)
        check(f"{title} training vs Keras 3 BN, jit", speedup("keras_bn_jit", ours), 3.5)
    for brn, bn in (("ours_brn", "ours_bn"), ("ours_brn_jit", "ours_bn_jit")):
        check(
            f"{C.LAYERS_BY_KEY[brn].title} training time ÷ {C.LAYERS_BY_KEY[bn].title}",
            slowdown(brn, bn),
            1.1,
            higher_is_better=False,
        )
    for ghost, bn in GHOST_PAIRS:
        check(
            f"{C.LAYERS_BY_KEY[ghost].title} training time ÷ {C.LAYERS_BY_KEY[bn].title}",
            slowdown(ghost, bn),
            1.1,
            higher_is_better=False,
        )
    for gn in ("ours_gn", "ours_gn_jit"):
        title = C.LAYERS_BY_KEY[gn].title
        check(f"{title} training vs Keras 3 GN, jit", speedup("keras_gn_jit", gn), 2.0)
    affine = t("infer", AFFINE)
    for key in ("ours_bn", "ours_bn_jit", "ours_brn", "ours_brn_jit"):
        value = t("infer", key)
        check(
            f"{C.LAYERS_BY_KEY[key].title} inference ÷ jit x·scale+shift",
            None if value is None else value / affine,
            1.15,
            higher_is_better=False,
        )
    gn, affine_time = t("infer", "ours_gn"), affine
    if gn is not None:
        lines.append(
            f"- (information) ours GN inference ÷ jit x·scale+shift: {gn / affine_time:.2f}× — "
            "group norm has no inference form: it computes its statistics (two reads of x) "
            "before the output pass"
        )
    fused = memory.get("fused_bn", {}).get("peak_bytes")
    for key in ("ours_bn", "ours_bn_jit"):
        peak = memory.get(key, {}).get("peak_bytes")
        check(
            f"{C.LAYERS_BY_KEY[key].title} training-step peak memory ÷ fused",
            None if peak is None or not fused else peak / fused,
            1.0,
            higher_is_better=False,
        )
    return lines


# Group norm's targets in copies of x: (kind, layer key, at most).
GROUP_NORM_COPIES = (("train", "ours_gn", 7.0), ("train", "ours_gn_jit", 5.5), ("infer", "ours_gn", 3.0),
                     ("infer", "ours_gn_jit", 3.0))


def group_norm_target_lines(results):
    """Group norm's times in copies of x on each of `C.GROUP_NORM_TARGET_SHAPES` measured, with verdicts."""
    lines = []
    for shape in C.GROUP_NORM_TARGET_SHAPES:
        r = results.get(shape)
        if r is None:
            continue
        floor = r[("train", COPY)].median
        for kind, key, goal in GROUP_NORM_COPIES:
            case = r.get((kind, key))
            if case is None:
                continue
            copies = case.median / floor
            step = "training step" if kind == "train" else "inference"
            verdict = "met" if copies <= goal else "NOT met"
            lines.append(
                f"- {C.LAYERS_BY_KEY[key].title} {step}, {shape.label}: {copies:.2f} copies of x "
                f"(target ≤ {goal}) — **{verdict}**"
            )
    return lines


def render(results, shapes, specs, memory, memory_shape, settings):
    import keras
    import tf_keras

    lines = [
        "# Benchmark results",
        "",
        f"Written by `python -m benchmarks.run{' --quick' if settings['quick'] else ''}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, tf_keras {tf_keras.__version__}, Python "
        f"{platform.python_version()}, float32.",
        "",
        f"Machine: {platform_info.describe()}.",
        "",
        "Training step = forward in training mode + loss `sum(y²)` + gradients of the input and "
        "the trainable weights, inside a `tf.function` (\"jit\": the step is compiled with XLA; "
        "our layers compile their own kernels with XLA either way). Without jit is what "
        "Keras 3's `fit` runs on a CPU-only machine (`jit_compile=\"auto\"` resolves to False "
        "there); with jit is `fit(jit_compile=True)` and Keras' default with an accelerator. "
        "GroupNorm uses 32 groups. Our layers run their XLA programs from the first "
        "training call here (`kerasbn.kernels.set_xla_policy(warmup_calls=0)`): the steady "
        "state a user's program reaches once a shape has recurred 50 times. "
        f"Times are medians of {settings['rounds']} interleaved rounds × "
        f"{settings['calls_per_round']} calls after {settings['warmup']} warm-up calls; all "
        "ratios are of medians from this same run. The rank-2 tf_keras row is its unfused "
        "graph (the fused kernel exists for rank 4 and 5 only).",
        "",
        "## Targets (" + (C.TARGET_SHAPE.label if C.TARGET_SHAPE in shapes else "n/a") + ")",
        "",
    ]
    lines += target_lines(results, memory, C.TARGET_SHAPE) + group_norm_target_lines(results)
    lines += ["", "## Training step (median, × copy-of-x floor)", ""]
    lines += times_table(results, shapes, specs, "train", COPY)
    lines += [""] + ratio_table(results, shapes, specs, "train")
    lines += ["", "## Inference (median, × jit `x·scale+shift` floor)", ""]
    lines += times_table(results, shapes, specs, "infer", AFFINE)
    lines += [""] + ratio_table(results, shapes, specs, "infer")
    lines += ["", "## Compile time of the first call", ""]
    lines += compile_table(results, shapes, specs)
    if memory:
        lines += ["", "## Peak memory of a training step", ""]
        methods = sorted({value["method"] for value in memory.values() if "method" in value})
        described = "; ".join(peak_memory.METHODS[method] for method in methods) or "n/a"
        lines += [
            "One step after warm-up, in a fresh process per layer, median of three steps. "
            f"Method: {described}. Both round (allocator bins, 4 KiB pages), so small "
            "differences are not significant.",
            "",
        ]
        lines += memory_table(memory, memory_shape)
    return "\n".join(lines) + "\n"


# -- entry point ------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke run)")
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/results.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--shapes", default=None, help="comma-separated shape indices (development)")
    parser.add_argument("--layers", default=None, help="comma-separated layer keys (development)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-axis", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    """Runs the benchmarks; the XLA policy they set is restored afterwards, so a
    caller in the same process (the tests) keeps its own."""
    import kerasbn

    with kerasbn.kernels.xla_policy():
        return _main(argv)


def _main(argv=None):
    args = parse_args(argv)
    if args.memory_case:
        dims = tuple(int(d) for d in args.memory_shape.split("x"))
        shape = C.Shape(dims, args.memory_axis, "")
        print(json.dumps(measure_memory_here(args.memory_case, shape)))
        return 0
    if args.quick:
        shapes = C.QUICK_SHAPES
        settings = dict(quick=True, rounds=args.rounds or 2, calls_per_round=2, warmup=1)
        memory_keys, memory_shape = QUICK_MEMORY_KEYS, C.QUICK_MEMORY_SHAPE
    else:
        shapes = C.FULL_SHAPES
        settings = dict(quick=False, rounds=args.rounds or 9, calls_per_round=5, warmup=2)
        memory_keys, memory_shape = MEMORY_KEYS, C.TARGET_SHAPE
    specs = available_specs()
    if args.shapes:
        shapes = tuple(shapes[int(i)] for i in args.shapes.split(","))
    if args.layers:
        specs = [spec for spec in specs if spec.key in args.layers.split(",")]
    results = {}
    for shape in shapes:
        print(f"timing {shape.label} ...", flush=True)
        results[shape] = time_shape(
            shape,
            specs,
            rounds=settings["rounds"],
            calls_per_round=settings["calls_per_round"],
            warmup=settings["warmup"],
        )
    memory = {}
    if not args.no_memory:
        keys = [key for key in memory_keys if key in {spec.key for spec in specs}]
        print(f"peak memory on {memory_shape.label} ...", flush=True)
        memory = measure_memory(keys, memory_shape)
    text = render(results, shapes, specs, memory, memory_shape, settings)
    report.write(text, args.output or DEFAULT_OUTPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
