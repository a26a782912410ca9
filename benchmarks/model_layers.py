"""Layer by layer: what a model's own normalization layers predict for its step.

A whole model's speed-up over Keras' BN follows, closely in our runs, from
what its normalization layers cost one by one (a prediction, not a bound).
For each model of `benchmarks.models`, every distinct normalization input
(shape, the activation fused after it, and how many layers of the model
have it) is timed alone as one training step (forward, backward,
loss `sum(y · w)`), three ways, interleaved in one process:

- "Keras BN": `keras.layers.BatchNormalization` followed by its activation
  layer, as the model has them;
- "kerasbn + act.": `kerasbn.BatchNorm` with the activation fused, as
  `kerasbn.convert(model, fuse_activations=True)` makes it;
- "activation alone": what the floor model of `benchmarks.models` keeps where
  a normalization was.

Weighted by how many layers have each input, and summed per round, they give
normalization's cost per step: Keras' `K − A` and ours `O − A` (medians over
rounds), and their quotient `p = (O − A) / (K − A)`, with a 90% bootstrap
interval over rounds.

The whole model is timed in the same process (Keras BN, kerasbn + act., no
normalization; `benchmarks.models`). With `R` = Keras ÷ floor there, Keras'
normalization costs `R − 1` floor steps, so if the layers cost in the model
what they cost alone, Keras ÷ ours = `R / (1 + (R − 1) p)`; and a target
speed-up `t` needs `p ≤ (R / t − 1) / (R − 1)`. The table prints the
prediction next to the measured speed-up.

    python -m benchmarks.model_layers                 # writes benchmarks/results_model_layers.md
    python -m benchmarks.model_layers --quick         # MobileNetV2 4@32, 1 round: a smoke run
    python -m benchmarks.model_layers --models DenseNet121 --rounds 30
"""

import argparse
import collections
import dataclasses
import datetime
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import kerasbn  # noqa: E402
from benchmarks import models, platform_info, report  # noqa: E402
from benchmarks.timing import Case, bootstrap_interval, measure  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results_model_layers.md")
KINDS = ("keras", "ours", "activation")
TITLES = {"keras": "Keras BN", "ours": "kerasbn + act.", "activation": "activation alone"}
WHOLE_VARIANTS = ("keras", "kerasbn_fused", "floor")


@dataclasses.dataclass(frozen=True)
class LayerInput:
    """One distinct normalization input of a model, and how many layers have it."""

    shape: tuple
    activation: str  # None: no activation follows the normalization
    epsilon: float
    momentum: float
    count: int

    @property
    def label(self):
        return "×".join(map(str, self.shape)) + f", {self.activation or 'none'}"


def layer_inputs(case):
    """The model's distinct normalization inputs, in order of first appearance.

    Read off `kerasbn.convert(model, fuse_activations=True)`: each
    `kerasbn.BatchNorm` with its fused activation, epsilon and momentum.
    """
    converted = models.build(case, "kerasbn_fused")
    counts = collections.Counter()
    for layer in converted.layers:
        if isinstance(layer, kerasbn.BatchNorm):
            shape = (case.batch,) + tuple(layer.input.shape[1:])
            counts[(shape, layer.activation, layer.epsilon, layer.momentum)] += 1
    if not counts:
        raise ValueError(f"{case.name} has no BatchNormalization layer to time.")
    return [LayerInput(*key, count=count) for key, count in counts.items()]


def _activation_layer(name):
    if name is None:
        return keras.layers.Identity()
    return keras.layers.Activation(name)


def layer_step(kind, layer_input, seed=0):
    """A zero-argument training step of one layer (`kind` in `KINDS`) at `layer_input`."""
    shape = layer_input.shape
    options = dict(epsilon=layer_input.epsilon, momentum=layer_input.momentum)
    if kind == "keras":
        stack = [keras.layers.BatchNormalization(**options), _activation_layer(layer_input.activation)]
    elif kind == "ours":
        stack = [kerasbn.BatchNorm(activation=layer_input.activation, **options)]
    elif kind == "activation":
        stack = [_activation_layer(layer_input.activation)]
    else:
        raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")
    for layer in stack:
        layer.build(shape)
    weights = [w for layer in stack for w in layer.trainable_weights]
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=shape).astype("float32"))
    upstream = tf.constant(rng.normal(size=shape).astype("float32"))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = x
            for layer in stack:
                y = layer(y, training=True)
            loss = tf.reduce_sum(y * upstream)
        return tape.gradient(loss, [x] + weights)

    return step


def time_layers(inputs, *, rounds, warmup):
    """Per-round totals `{kind: array}` of the layers' steps weighted by count,
    and the per-input `{(input, kind): Case}`; everything interleaved.
    """
    cases = {
        (layer_input, kind): Case(f"{layer_input.label}, {kind}", layer_step(kind, layer_input))
        for layer_input in inputs
        for kind in KINDS
    }
    measure(list(cases.values()), warmup=warmup, rounds=rounds, calls_per_round=1)
    totals = {
        kind: sum(
            layer_input.count * np.asarray(cases[(layer_input, kind)].samples) for layer_input in inputs
        )
        for kind in KINDS
    }
    return totals, cases


def cost_fraction(keras_total, ours_total, activation_total):
    """`p = (O − A) / (K − A)` from per-round times or totals (medians over
    rounds); NaN when Keras' normalization costs nothing measurable (K ≤ A)."""
    keras_cost = np.median(keras_total) - np.median(activation_total)
    ours_cost = np.median(ours_total) - np.median(activation_total)
    return float(ours_cost / keras_cost) if keras_cost > 0 else float("nan")


def predicted_speedup(floor_ratio, fraction):
    """Keras ÷ ours if each layer costs in the model what it costs alone."""
    return floor_ratio / (1.0 + (floor_ratio - 1.0) * fraction)


def fraction_needed(floor_ratio, target):
    """The largest `p` with which `predicted_speedup` reaches `target`: ≤ 0
    when even free normalization (the floor) would not; None when the floor
    is no faster than Keras (`floor_ratio` ≤ 1: nothing to predict from)."""
    if floor_ratio <= 1.0:
        return None
    return (floor_ratio / target - 1.0) / (floor_ratio - 1.0)


@dataclasses.dataclass
class ModelResult:
    case: models.ModelCase
    inputs: list
    totals: dict  # kind -> per-round totals (seconds)
    layer_cases: dict  # (input, kind) -> Case
    whole: dict  # (step kind, variant) -> Case, from `models.time_model`

    @property
    def fraction(self):
        return cost_fraction(self.totals["keras"], self.totals["ours"], self.totals["activation"])

    def fraction_interval(self):
        """90% bootstrap interval of `p`, rounds resampled together; None below
        `models.MIN_ROUNDS_FOR_INTERVAL` rounds."""
        if len(self.totals["keras"]) < models.MIN_ROUNDS_FOR_INTERVAL:
            return None
        try:
            return bootstrap_interval(
                cost_fraction, self.totals["keras"], self.totals["ours"], self.totals["activation"]
            )
        except ValueError:  # K ≤ A in some resample: p has no interval worth the name
            return None

    @property
    def floor_ratio(self):
        return self.whole[("plain", "keras")].median / self.whole[("plain", "floor")].median


def time_model(case, *, rounds, warmup):
    """The layers of `case` one by one, then the whole model, in this process."""
    inputs = layer_inputs(case)
    totals, layer_cases = time_layers(inputs, rounds=rounds, warmup=warmup)
    whole = models.time_model(
        case, step_kinds=("plain",), rounds=rounds, warmup=warmup, variants=WHOLE_VARIANTS, predict=False
    )
    return ModelResult(case, inputs, totals, layer_cases, whole)


def _needed_text(floor_ratio, target):
    if target is None:
        return "n/a"
    needed = fraction_needed(floor_ratio, target)
    if needed is None:
        return f"≥ {target}×: n/a (floor not faster than Keras)"
    if needed <= 0:
        return f"≥ {target}×: out of reach (floor {floor_ratio:.2f}×)"
    return f"≥ {target}×: p ≤ {needed:.2f}"


def _ms(seconds):
    return f"{np.median(seconds) * 1e3:.1f} ms"


def _fraction_text(result):
    interval = result.fraction_interval()
    text = f"{result.fraction:.2f}"
    return text if interval is None else f"{text} ({interval[0]:.2f}–{interval[1]:.2f})"


def summary_table(results):
    lines = [
        "| model, batch, input | layers (distinct inputs) | "
        + " | ".join(TITLES[kind] for kind in KINDS)
        + " | p = ours ÷ Keras' cost | Keras ÷ floor, whole model "
        "| predicted Keras ÷ ours | measured Keras ÷ ours | target: p needed |",
        "|---" * 10 + "|",
    ]
    for result in results:
        keras_case = result.whole[("plain", "keras")]
        ours_case = result.whole[("plain", "kerasbn_fused")]
        floor_ratio = result.floor_ratio
        target = models.TARGETS.get(result.case.key, {}).get("kerasbn_fused")
        needed = _needed_text(floor_ratio, target)
        layers = sum(layer_input.count for layer_input in result.inputs)
        lines.append(
            f"| {result.case.label} | {layers} ({len(result.inputs)}) "
            f"| {' | '.join(_ms(result.totals[kind]) for kind in KINDS)} | {_fraction_text(result)} "
            f"| {floor_ratio:.2f}× | {predicted_speedup(floor_ratio, result.fraction):.2f}× "
            f"| {models.speedup_with_interval(keras_case, ours_case)} | {needed} |"
        )
    return lines


def detail_table(result):
    """One row per distinct input: medians and this input's share of the cost."""
    lines = [
        f"### {result.case.label}",
        "",
        "| input, activation | layers | "
        + " | ".join(TITLES[kind] for kind in KINDS)
        + " | ours ÷ Keras' cost |",
        "|---" * 6 + "|",
    ]
    for layer_input in result.inputs:
        samples = {kind: result.layer_cases[(layer_input, kind)].samples for kind in KINDS}
        medians = {kind: np.median(samples[kind]) for kind in KINDS}
        fraction = cost_fraction(samples["keras"], samples["ours"], samples["activation"])
        lines.append(
            f"| {layer_input.label} | {layer_input.count} | "
            + " | ".join(f"{medians[kind] * 1e3:.3f} ms" for kind in KINDS)
            + f" | {fraction:.2f} |"
        )
    return lines


def render(results, settings):
    lines = [
        "# Layer by layer: normalization's cost in whole models",
        "",
        f"Written by `python -m benchmarks.model_layers {settings['argv']}`".rstrip() + " on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, kerasbn {kerasbn.__version__}, float32.",
        "",
        f"Machine: {platform_info.describe()}.",
        "",
        "Each distinct normalization input of the model timed alone as a training step "
        "(forward, backward, loss `sum(y · w)`), weighted by how many layers have it and "
        f"summed per round; medians of {settings['rounds']} interleaved rounds after "
        f"{settings['warmup']} warm-up calls. p = (kerasbn + act. − activation alone) ÷ "
        "(Keras BN − activation alone), with its 90% bootstrap interval over rounds "
        f"(none below {models.MIN_ROUNDS_FOR_INTERVAL} rounds). The whole model "
        "(`benchmarks.models`, plain `train_on_batch`) timed in the same process gives "
        "R = Keras ÷ floor; predicted Keras ÷ ours = R / (1 + (R − 1) p), and a target t "
        "needs p ≤ (R / t − 1) / (R − 1) (module docstring).",
        "",
        "## Summary",
        "",
    ]
    lines += summary_table(results)
    lines += ["", "## Per input", ""]
    for result in results:
        lines += detail_table(result) + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small model, 1 round")
    parser.add_argument("--models", default=None, help="comma-separated names, e.g. MobileNetV2")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 16)")
    parser.add_argument("--output", default=None, help="markdown file (default benchmarks/results_model_layers.md)")
    args = parser.parse_args(argv)
    selected, rounds = models.selected_models(parser, args, default_rounds=16)
    warmup = models.WARMUP_CALLS + 1
    results = []
    # Restored afterwards: a caller in the same process (the tests) keeps its policy.
    with kerasbn.kernels.xla_policy(warmup_calls=models.WARMUP_CALLS):
        for case in selected:
            print(f"timing {case.label} layer by layer, then whole ...", flush=True)
            results.append(time_model(case, rounds=rounds, warmup=warmup))
    settings = dict(rounds=rounds, warmup=warmup, argv=" ".join(argv if argv is not None else sys.argv[1:]))
    text = render(results, settings)
    report.write(text, args.output or DEFAULT_OUTPUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
