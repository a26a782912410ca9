"""What a new shape costs: `predict` over many batch sizes, and a first `fit` epoch.

Each measurement runs in a fresh subprocess (nothing traced or compiled yet,
as for a user starting a program), a few times, the variants interleaved; the
table reports medians and ratios to Keras' own layers. The model is
MobileNetV2 (alpha 0.35, 32×32 inputs, 10 classes) as built by
`keras.applications`, with:

- "Keras BN": its own `keras.layers.BatchNormalization`;
- "kerasbn": `kerasbn.convert(model)`;
- "Keras GN" and "kerasbn GN": every batch norm replaced by a group norm
  (Keras' `GroupNormalization`, ours), groups of 8 channels.

`predict`: `model.predict(x[:b])` for b = 1 … 40 in turn, the total time.
`fit`: one epoch over 525 samples in batches of 32 (16 full batches and a last
one of 13), `model.fit(..., epochs=1)` timed whole: tracing, any compilation,
and the steps, with the default XLA policy. The step is traced with an unknown
batch size. `fit, full batches`: the same over 512 samples, 16 full batches:
the step is traced with the batch size known, so small layers go inline.

    python -m benchmarks.first_calls                    # writes benchmarks/results_first_calls.md
    python -m benchmarks.first_calls --repeats 1        # quicker, noisier
    python -m benchmarks.first_calls --case predict --variant kerasbn   # one measurement
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("keras", "kerasbn", "keras_gn", "kerasbn_gn")
TITLES = {"keras": "Keras BN", "kerasbn": "kerasbn", "keras_gn": "Keras GN", "kerasbn_gn": "kerasbn GN"}
CASES = ("predict", "fit", "fit_full")
BATCH_SIZES = range(1, 41)
FIT_SAMPLES, FIT_BATCH = 525, 32
FULL_FIT_SAMPLES = 512
TARGETS = {"predict": 1.2, "fit": 1.5, "fit_full": 1.5}  # ours ÷ Keras, at most
TARGET_NAMES = {
    "predict": "predict at new batch sizes",
    "fit": "first fit epoch, partial last batch",
    "fit_full": "first fit epoch, full batches",
}


def _groups(channels):
    return channels // 8 if channels % 8 == 0 else 1


def build(variant):
    import keras

    import kerasbn

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None, alpha=0.35, input_shape=(32, 32, 3), classes=10
    )
    if variant == "kerasbn":
        model = kerasbn.convert(model)
    elif variant in ("keras_gn", "kerasbn_gn"):
        model = kerasbn.convert(model, batch_norm_to=kerasbn.GroupNorm, groups=_groups)
        if variant == "keras_gn":
            model = kerasbn.to_keras(model)
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


def measure_here(case, variant):
    """Seconds for `case` on a freshly built `variant`, in this (fresh) process."""
    import numpy as np

    model = build(variant)
    rng = np.random.default_rng(0)
    if case == "predict":
        x = rng.normal(size=(max(BATCH_SIZES), 32, 32, 3)).astype("float32")
        start = time.perf_counter()
        for batch in BATCH_SIZES:
            model.predict(x[:batch], verbose=0)
        return time.perf_counter() - start
    samples = FIT_SAMPLES if case == "fit" else FULL_FIT_SAMPLES
    x = rng.normal(size=(samples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(samples,))
    start = time.perf_counter()
    model.fit(x, y, batch_size=FIT_BATCH, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def measure(variants=VARIANTS, cases=CASES, repeats=3):
    """`{(case, variant): [seconds, ...]}`, each value from a fresh subprocess."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    results = {(case, variant): [] for case in cases for variant in variants}
    for repeat in range(repeats):
        order = list(results)
        if repeat % 2:
            order.reverse()
        for case, variant in order:
            command = [sys.executable, "-m", "benchmarks.first_calls", "--case", case, "--variant", variant]
            process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
            if process.returncode != 0 or not lines:
                raise RuntimeError(f"{case}/{variant} failed:\n{process.stderr[-2000:]}")
            results[(case, variant)].append(json.loads(lines[-1])["seconds"])
    return results


def table(results, variants=VARIANTS, cases=CASES):
    lines = [
        "| new shapes | " + " | ".join(TITLES[v] for v in variants) + " | kerasbn ÷ Keras BN | kerasbn GN ÷ Keras GN |",
        "|---" * (len(variants) + 3) + "|",
    ]
    labels = {
        "predict": f"`predict` at batch sizes 1…{max(BATCH_SIZES)} (total)",
        "fit": f"first `fit` epoch, {FIT_SAMPLES} samples in batches of {FIT_BATCH}",
        "fit_full": f"first `fit` epoch, {FULL_FIT_SAMPLES} samples in batches of {FIT_BATCH}",
    }
    for case in cases:
        medians = {v: statistics.median(results[(case, v)]) for v in variants if (case, v) in results}
        cells = [f"{medians[v]:.1f} s" if v in medians else "n/a" for v in variants]

        def ratio(ours, anchor):
            return f"{medians[ours] / medians[anchor]:.2f}×" if ours in medians and anchor in medians else "n/a"

        lines.append(
            f"| {labels[case]} | " + " | ".join(cells)
            + f" | {ratio('kerasbn', 'keras')} | {ratio('kerasbn_gn', 'keras_gn')} |"
        )
    return lines


def target_lines(results, variants=VARIANTS, cases=CASES):
    lines = []
    for case in cases:
        for ours, anchor in (("kerasbn", "keras"), ("kerasbn_gn", "keras_gn")):
            if (case, ours) not in results or (case, anchor) not in results:
                continue
            value = statistics.median(results[(case, ours)]) / statistics.median(results[(case, anchor)])
            goal = TARGETS[case]
            verdict = "met" if value <= goal else "NOT met"
            lines.append(
                f"- {TARGET_NAMES[case]}, {TITLES[ours]} time ÷ {TITLES[anchor]}: {value:.2f}× "
                f"(target ≤ {goal}×) — **{verdict}**"
            )
    return lines


def render(results, repeats):
    import datetime

    import keras
    import tensorflow as tf

    import kerasbn
    from benchmarks import platform_info

    lines = [
        "# What a new shape costs: first calls",
        "",
        f"Written by `python -m benchmarks.first_calls` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}: TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}, kerasbn {kerasbn.__version__}.",
        "",
        f"Machine: {platform_info.describe()}.",
        "",
        f"Medians of {repeats} fresh processes per cell, variants interleaved. "
        + __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "## Targets",
        "",
        *target_lines(results),
        "",
        "## Times",
        "",
        *table(results),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="one measurement in this process")
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results_first_calls.md"))
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if args.case or args.variant:
        if not (args.case and args.variant):
            parser.error("--case and --variant go together")
        print(json.dumps({"seconds": measure_here(args.case, args.variant)}))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    results = measure(repeats=args.repeats)
    text = render(results, args.repeats)
    report.write(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
