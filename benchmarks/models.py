"""End to end: whole `keras.applications` models, Keras' BN against ours.

For each model (random weights, 10 classes) the same network is built four
ways and timed side by side in one process, interleaved:

- "Keras BN": as `keras.applications` builds it (`keras.layers.BatchNormalization`);
- "kerasbn": `kerasbn.convert(model)`;
- "kerasbn + act.": `kerasbn.convert(model, fuse_activations=True)`, each
  normalization fused with the activation that follows it;
- "no normalization": every normalization replaced by the identity, the
  activations left in place: the floor, what the step would cost if
  normalization were free.

A training step is `model.train_on_batch(x, y)` (SGD, sparse categorical
cross-entropy): "plain" is Keras' CPU default (`jit_compile="auto"` resolves
to False without an accelerator), "jit" is `compile(jit_compile=True)`.
Inference is `model.predict_on_batch(x)`. Medians over interleaved rounds
(`benchmarks.timing`).

Our training kernels compile with XLA once an input shape has recurred
(`kerasbn.kernels.set_xla_policy`, 50 calls by default): the steady state is
measured after that, with the threshold lowered to 2 calls in this process so
warming up does not take 50 steps per model (the steady state is the same).

    python -m benchmarks.models                  # writes benchmarks/results_models.md
    python -m benchmarks.models --quick          # MobileNetV2 4@32, plain step: a smoke run
    python -m benchmarks.models --models MobileNetV2,EfficientNetB0 --steps plain,jit
    python -m benchmarks.models --no-memory      # without the peak-memory subprocesses

Peak memory of a plain training step is measured for each model and variant in a fresh process
(`benchmarks.peak_memory`: the BFC allocator's statistics where it is in use, the resident set
otherwise), after the same warm-up, so that one variant's cached buffers cannot hide another's.
"""

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402
from benchmarks import peak_memory, platform_info, report  # noqa: E402
from benchmarks.timing import Case, measure, ratio_interval  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results_models.md")
STEP_KINDS = ("plain", "jit")
WARMUP_CALLS = 2  # our XLA threshold in this process (see the module docstring)


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A `keras.applications` model, its batch and input size; `activation`: None, or the
    activation replacing every relu `Activation` layer (an invertible one: InPlace-ABN's case)."""

    name: str
    batch: int
    size: int
    activation: str = None

    @property
    def key(self):
        """What `--models` selects it by: the name, with `:activation` when one is set."""
        return f"{self.name}:{self.activation}" if self.activation else self.name

    @property
    def label(self):
        activation = f" ({self.activation})" if self.activation else ""
        return f"{self.name}{activation}, {self.batch}, {self.size}×{self.size}"

    def application(self):
        return getattr(keras.applications, self.name)


MODELS = (
    ModelCase("MobileNetV2", 32, 96),
    ModelCase("EfficientNetB0", 32, 96),
    ModelCase("ResNet50", 16, 64),
    ModelCase("DenseNet121", 16, 64),
    ModelCase("ResNet50", 16, 64, activation="leaky_relu"),
)
QUICK_MODELS = (ModelCase("MobileNetV2", 4, 32),)

VARIANTS = ("keras", "kerasbn", "kerasbn_fused", "floor")
TITLES = {
    "keras": "Keras BN",
    "kerasbn": "kerasbn",
    "kerasbn_fused": "kerasbn + act.",
    "floor": "no normalization",
}
# The targets, whole training step, ours ÷ Keras BN speed-up.
TARGETS = {
    "MobileNetV2": {"kerasbn_fused": 1.3},
    "EfficientNetB0": {"kerasbn_fused": 1.3},
    "ResNet50": {"kerasbn": 1.0, "kerasbn_fused": 1.15},
    "DenseNet121": {"kerasbn": 1.0, "kerasbn_fused": 1.15},
}


class NoNormalization(keras.layers.Layer):
    """The identity, standing for a normalization layer in the floor model."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def without_normalization(model):
    def clone(layer):
        if isinstance(layer, (keras.layers.BatchNormalization, keras.layers.GroupNormalization)):
            return NoNormalization(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone)
    return copy


def with_activation(model, activation):
    """`model` with each relu `Activation` layer computing `activation` instead."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Activation) and config["activation"] == "relu":
            config["activation"] = activation
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone)


def build(case, variant, seed=0):
    """The model of `case` as `variant`, with the same initial weights for every variant."""
    keras.utils.set_random_seed(seed)
    model = case.application()(
        weights=None, input_shape=(case.size, case.size, 3), classes=10
    )
    if case.activation:
        model = with_activation(model, case.activation)
    if variant == "kerasbn":
        return kerasbn.convert(model)
    if variant == "kerasbn_fused":
        return kerasbn.convert(model, fuse_activations=True)
    if variant == "floor":
        return without_normalization(model)
    return model


def data(case, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(case.batch, case.size, case.size, 3)).astype("float32")
    y = rng.integers(0, 10, size=(case.batch,))
    return x, y


def time_model(case, *, step_kinds, rounds, warmup, variants=VARIANTS, predict=True):
    """`{(kind, variant): Case}` for kind in step_kinds (+ "predict" when
    `predict` and "plain" is among them), timed interleaved.

    All variants of one step kind are built, compiled and warmed up, then
    timed together; then the next kind (so at most four models live at once).
    """
    x, y = data(case)
    results = {}
    for kind in step_kinds:
        cases = {}
        for variant in variants:
            model = build(case, variant)
            model.compile(
                keras.optimizers.SGD(0.01),
                "sparse_categorical_crossentropy",
                jit_compile=(kind == "jit"),
            )

            def train(model=model):
                model.train_on_batch(x, y)

            cases[(kind, variant)] = Case(f"{TITLES[variant]}, {kind}", train)
            if kind == "plain" and predict:

                def predict_step(model=model):
                    model.predict_on_batch(x)

                cases[("predict", variant)] = Case(f"{TITLES[variant]}, predict", predict_step)
        measure(list(cases.values()), warmup=warmup, rounds=rounds, calls_per_round=1)
        results.update(cases)
    return results


def measure_memory_here(case, variant):
    """`{"peak_bytes", "method"}` of one plain training step of `case` as `variant`, in this
    process (which should be fresh), after the warm-up the timed steps get."""
    x, y = data(case)
    model = build(case, variant)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy", jit_compile=False)
    with kerasbn.kernels.xla_policy(warmup_calls=WARMUP_CALLS):
        for _ in range(WARMUP_CALLS + 1):
            model.train_on_batch(x, y)
        peak, method = peak_memory.peak_over_resident(lambda: model.train_on_batch(x, y))
    return {"peak_bytes": peak, "method": method}


def measure_memory(case, variants):
    """`{variant: result}` of `measure_memory_here`, each in a subprocess of its own, one at a
    time (two would share the machine's memory bandwidth, not its memory: but they would slow
    each other's warm-up); a failed one gives `{"error": last line of its stderr}`."""
    env = peak_memory.subprocess_environment(dict(os.environ, KERAS_BACKEND="tensorflow"))
    results = {}
    for variant in variants:
        command = [sys.executable, "-m", "benchmarks.models", "--memory-case", f"{case.name},{variant}"]
        command += ["--memory-activation", case.activation or ""]
        command += ["--memory-batch", str(case.batch), "--memory-size", str(case.size)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            results[variant] = {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            results[variant] = json.loads(lines[-1])
    return results


def memory_cell(memory, variant):
    """'1518 MiB (1.00×)': the peak, and ÷ Keras BN's."""
    value, anchor = memory.get(variant, {}), memory.get("keras", {})
    if "peak_bytes" not in value:
        return "error" if "error" in value else "n/a"
    text = f"{value['peak_bytes'] / 2**20:.0f} MiB"
    if anchor.get("peak_bytes"):
        text += f" ({value['peak_bytes'] / anchor['peak_bytes']:.2f}×)"
    return text


# The memory targets: a plain training step's peak, the variant ÷ Keras BN's, at most.
MEMORY_TARGETS = {
    "MobileNetV2": {"kerasbn_fused": 1.0},
    "EfficientNetB0": {"kerasbn_fused": 1.0},
    "ResNet50:leaky_relu": {"kerasbn_fused": 0.85},
}


def memory_target_lines(memory_by_model):
    lines = []
    for case, memory in memory_by_model.items():
        anchor = memory.get("keras", {}).get("peak_bytes")
        for variant, goal in MEMORY_TARGETS.get(case.key, {}).items():
            peak = memory.get(variant, {}).get("peak_bytes")
            if anchor and peak:
                verdict = "met" if peak / anchor <= goal else "NOT met"
                lines.append(
                    f"- {case.label}, peak memory of a plain step, {TITLES[variant]} ÷ Keras BN: "
                    f"{peak / anchor:.2f}× (target ≤ {goal}×) — **{verdict}**"
                )
    return lines


def memory_table(memory_by_model):
    """Rows: models; cells: a plain training step's peak memory per variant, ÷ Keras BN's."""
    variants = [v for v in VARIANTS if any(v in memory for memory in memory_by_model.values())]
    lines = [
        "| model, batch, input | " + " | ".join(TITLES[v] for v in variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    for case, memory in memory_by_model.items():
        lines.append(f"| {case.label} | " + " | ".join(memory_cell(memory, v) for v in variants) + " |")
    return lines


def step_table(results_by_model, step_kinds):
    """Rows: model × step kind; cells: median ms, and ratios Keras ÷ ours."""
    lines = [
        "| model, batch, input | step | "
        + " | ".join(TITLES[v] for v in VARIANTS)
        + " | Keras ÷ kerasbn | Keras ÷ kerasbn + act. | Keras ÷ floor |",
        "|---" * (len(VARIANTS) + 5) + "|",
    ]
    for case, results in results_by_model.items():
        for kind in step_kinds + ("predict",):
            row = {v: results.get((kind, v)) for v in VARIANTS}
            if row["keras"] is None:
                continue
            cells = [f"{row[v].median * 1e3:.0f} ms" if row[v] else "n/a" for v in VARIANTS]

            def speedup(v):
                return speedup_with_interval(row["keras"], row[v]) if row[v] else "n/a"

            lines.append(
                f"| {case.label} | {kind} | " + " | ".join(cells)
                + f" | {speedup('kerasbn')} | {speedup('kerasbn_fused')} | {speedup('floor')} |"
            )
    return lines


# Fewer rounds give no interval worth the name (one round: a point).
MIN_ROUNDS_FOR_INTERVAL = 5


def _interval(keras_case, ours):
    """The bootstrap interval of Keras ÷ ours, or None with too few rounds.

    Both cases were timed once per round by one `measure` call: paired.
    """
    if min(len(keras_case.samples), len(ours.samples)) < MIN_ROUNDS_FOR_INTERVAL:
        return None
    return ratio_interval(keras_case.samples, ours.samples, paired=True)


def speedup_with_interval(keras_case, ours):
    """'1.24× (1.18–1.31)': Keras' median ÷ ours and its bootstrap interval
    ('1.24×' alone below `MIN_ROUNDS_FOR_INTERVAL` rounds)."""
    text = f"{keras_case.median / ours.median:.2f}×"
    interval = _interval(keras_case, ours)
    return text if interval is None else f"{text} ({interval[0]:.2f}–{interval[1]:.2f})"


def verdict(keras_case, ours, goal):
    """'met' when the whole interval of Keras ÷ ours reaches `goal`, 'NOT met'
    when none of it does, 'within noise' when it straddles `goal`, and 'not
    judged' below `MIN_ROUNDS_FOR_INTERVAL` rounds."""
    interval = _interval(keras_case, ours)
    if interval is None:
        return f"not judged: {min(len(keras_case.samples), len(ours.samples))} rounds"
    low, high = interval
    if low >= goal:
        return "met"
    if high < goal:
        return "NOT met"
    return "within noise"


def target_lines(results_by_model, step_kinds):
    """The issue's end-to-end targets with their measured values and verdicts."""
    lines = []
    for case, results in results_by_model.items():
        for kind in step_kinds:
            keras_case = results.get((kind, "keras"))
            floor = results.get((kind, "floor"))
            for variant, goal in TARGETS.get(case.key, {}).items():
                ours = results.get((kind, variant))
                if keras_case is None or ours is None:
                    continue
                bound = f"; floor {keras_case.median / floor.median:.2f}×" if floor else ""
                lines.append(
                    f"- {case.key} {kind} step, Keras ÷ {TITLES[variant]}: "
                    f"{speedup_with_interval(keras_case, ours)} "
                    f"(target ≥ {goal}×{bound}) — **{verdict(keras_case, ours, goal)}**"
                )
        predict_keras = results.get(("predict", "keras"))
        for variant in ("kerasbn", "kerasbn_fused"):
            ours = results.get(("predict", variant))
            if predict_keras and ours:
                lines.append(
                    f"- {case.key} predict, Keras ÷ {TITLES[variant]}: "
                    f"{speedup_with_interval(predict_keras, ours)} "
                    f"(target ≥ 1.0×) — **{verdict(predict_keras, ours, 1.0)}**"
                )
    return lines


def render(results_by_model, step_kinds, settings, memory_by_model=None):
    import tensorflow as tf

    lines = [
        "# End-to-end benchmark: whole models",
        "",
        f"Written by `python -m benchmarks.models {settings['argv']}`".rstrip() + " on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, kerasbn {kerasbn.__version__}, float32.",
        "",
        f"Machine: {platform_info.describe()}.",
        "",
        "`train_on_batch` (SGD, sparse categorical cross-entropy, random weights, 10 classes) "
        "and `predict_on_batch`; \"plain\" is Keras' CPU default, \"jit\" is "
        "`compile(jit_compile=True)`. Medians of "
        f"{settings['rounds']} interleaved rounds after {settings['warmup']} warm-up steps "
        f"(our XLA threshold set to {WARMUP_CALLS} calls in this process, so the warm-up "
        "reaches the steady state); ratios are Keras' time ÷ the variant's, from this same run, "
        "with in parentheses the 90% bootstrap interval over rounds (resampled in pairs, "
        "`timing.ratio_interval`). A target is met when the whole interval reaches it, "
        "NOT met when none of it does, and within noise otherwise (with fewer than "
        f"{MIN_ROUNDS_FOR_INTERVAL} rounds, not judged). Each interval misses its ratio "
        "one time in ten, so among many verdicts expect a few wrong by chance.",
        "",
        "## Targets",
        "",
    ]
    lines += target_lines(results_by_model, step_kinds) or ["(none measured in this run)"]
    lines += ["", "## Training step and inference (median)", ""]
    lines += step_table(results_by_model, step_kinds)
    if memory_by_model:
        methods = sorted({v["method"] for m in memory_by_model.values() for v in m.values() if "method" in v})
        lines += [
            "",
            "## Peak memory of a plain training step",
            "",
            "One `train_on_batch` after the warm-up, in a fresh process per model and variant, "
            "median of three steps; ÷ Keras BN's in parentheses. Method: "
            + ("; ".join(peak_memory.METHODS[m] for m in methods) or "n/a") + ".",
            "",
        ]
        lines += memory_table(memory_by_model) + [""] + memory_target_lines(memory_by_model)
    return "\n".join(lines) + "\n"


def selected_models(parser, args, *, default_rounds):
    """`(models, rounds)` from `--quick`, `--models` and `--rounds` (1 round
    by default with `--quick`); `parser.error` names a bad option."""
    available = QUICK_MODELS if args.quick else MODELS
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else default_rounds)
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if not args.models:
        return available, rounds
    wanted = args.models.split(",")
    unknown = set(wanted) - {case.key for case in available}
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {[c.key for c in available]}")
    return tuple(case for case in available if case.key in wanted), rounds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, plain step, 1 round")
    parser.add_argument("--models", default=None, help="comma-separated names, e.g. MobileNetV2")
    parser.add_argument("--steps", default=None, help="comma-separated: plain, jit")
    parser.add_argument("--variants", default=None, help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/results_models.md)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-activation", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        name, variant = args.memory_case.split(",")
        case = ModelCase(name, args.memory_batch, args.memory_size, args.memory_activation or None)
        print(json.dumps(measure_memory_here(case, variant)))
        return 0
    models, rounds = selected_models(parser, args, default_rounds=6)
    step_kinds = ("plain",) if args.quick else STEP_KINDS
    warmup = WARMUP_CALLS + 1
    if args.steps:
        step_kinds = tuple(args.steps.split(","))
        if set(step_kinds) - set(STEP_KINDS):
            parser.error(f"--steps: choose from {STEP_KINDS}")
    variants = VARIANTS
    if args.variants:
        variants = tuple(args.variants.split(","))
        if "keras" not in variants or set(variants) - set(VARIANTS):
            parser.error(f"--variants: choose from {VARIANTS}, keras included (the anchor)")
    results = {}
    # Restored afterwards: a caller in the same process (the tests) keeps its policy.
    with kerasbn.kernels.xla_policy(warmup_calls=WARMUP_CALLS):
        for case in models:
            print(f"timing {case.label} ...", flush=True)
            results[case] = time_model(
                case, step_kinds=step_kinds, rounds=rounds, warmup=warmup, variants=variants
            )
    memory = {}
    if not args.no_memory:
        for case in models:
            print(f"peak memory of {case.label} ...", flush=True)
            memory[case] = measure_memory(case, variants)
    settings = dict(rounds=rounds, warmup=warmup, argv=" ".join(argv if argv is not None else sys.argv[1:]))
    text = render(results, step_kinds, settings, memory)
    report.write(text, args.output or DEFAULT_OUTPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
