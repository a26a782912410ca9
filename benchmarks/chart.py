"""A chart of the whole-model table: `benchmarks/results_models.md` as an SVG.

One group of bars per model and step (plain, jit, predict): the speed of
kerasbn, kerasbn with fused activations and the floor (no normalization at
all) relative to Keras' BatchNormalization, as Keras' median time ÷ the
variant's (above 1: faster than Keras), with the 90% bootstrap interval the
table gives as whiskers. Keras BN is the line at 1. The title carries the
machine and oneDNN state the results file records.

    python -m benchmarks.chart     # benchmarks/results_models.md -> benchmarks/results_models.svg
    python -m benchmarks.chart --input benchmarks/results_models_bfc.md --output /tmp/bfc.svg

Reads the table with the markdown table reader the tests share (`benchmarks/markdown_tables.py`),
so run it from the repository root. Needs matplotlib (the `tutorials` extra,
which `make install` installs).
"""

import argparse
import dataclasses
import os
import re
import textwrap

from benchmarks.markdown_tables import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO, "benchmarks", "results_models.md")
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results_models.svg")

# The columns `benchmarks.models.step_table` writes (its TITLES), by name.
HEADER_START = "model, batch, input"
KERAS_MS = "Keras BN"
RATIO_COLUMNS = {
    "kerasbn": "Keras ÷ kerasbn",
    "kerasbn + act.": "Keras ÷ kerasbn + act.",
    "no normalization (floor)": "Keras ÷ floor",
}
COLORS = {"kerasbn": "#4c72b0", "kerasbn + act.": "#dd8452", "no normalization (floor)": "none"}
LABELS = {
    "kerasbn": "kerasbn",
    "kerasbn + act.": "kerasbn + act. (fused activations)",
    "no normalization (floor)": "no normalization (the floor)",
}

# '1.35× (1.29–1.48)', '1.35×' (too few rounds for an interval) or 'n/a' (not timed).
NUMBER = r"(\d+(?:\.\d+)?)"
RATIO = re.compile(rf"{NUMBER}×(?: \({NUMBER}–{NUMBER}\))?")
MILLISECONDS = re.compile(r"(\d+(?:\.\d+)?) ms")


@dataclasses.dataclass(frozen=True)
class Ratio:
    """Keras' median ÷ a variant's, and its 90% interval (None without one)."""

    value: float
    low: float | None = None
    high: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    model: str  # 'MobileNetV2, 32, 96×96'
    step: str  # 'plain', 'jit' or 'predict'
    keras_ms: float
    ratios: dict  # RATIO_COLUMNS key -> Ratio, or None for 'n/a'


@dataclasses.dataclass(frozen=True)
class Results:
    rows: list
    machine: str  # the file's 'Machine: ...' line, without the prefix
    written: str  # the file's 'Written by ...' line, or ''


def parse_ratio(cell, where):
    if cell == "n/a":
        return None
    found = RATIO.fullmatch(cell)
    if found is None:
        raise ValueError(f"{where}: {cell!r} is not a ratio such as '1.35× (1.29–1.48)', '1.35×' or 'n/a'")
    value, low, high = (None if group is None else float(group) for group in found.groups())
    if low is not None and not low <= high:
        raise ValueError(f"{where}: interval {cell!r} has its low end above its high end")
    return Ratio(value, low, high)


def read_results(text, source="the results"):
    """The rows of the whole-model table and the machine line of a results file.

    Raises:
      ValueError: no whole-model table, a column missing, a row of the wrong
        width, a cell that is not a time or ratio, no rows, or no machine line.
    """
    try:
        header, body = table(text, HEADER_START)
    except (StopIteration, AssertionError, ValueError) as error:
        raise ValueError(
            f"{source}: no markdown table whose header starts with {HEADER_START!r} "
            "followed by a |---| separator row"
        ) from error
    missing = [name for name in ("step", KERAS_MS, *RATIO_COLUMNS.values()) if name not in header]
    if missing:
        raise ValueError(f"{source}: the whole-model table has no column {missing}; its header: {header}")
    if not body:
        raise ValueError(f"{source}: the whole-model table has no rows")
    rows = []
    for number, cells in enumerate(body, start=1):
        where = f"{source}, table row {number}"
        if len(cells) != len(header):
            raise ValueError(f"{where}: {len(cells)} cells, the header has {len(header)}")
        cell = dict(zip(header, cells))
        milliseconds = MILLISECONDS.fullmatch(cell[KERAS_MS])
        if milliseconds is None:
            raise ValueError(f"{where}: Keras BN time {cell[KERAS_MS]!r} is not like '262 ms'")
        ratios = {name: parse_ratio(cell[column], f"{where}, {column}") for name, column in RATIO_COLUMNS.items()}
        rows.append(Row(cells[0], cell["step"], float(milliseconds.group(1)), ratios))
    lines = text.splitlines()
    machine = [line.removeprefix("Machine: ").rstrip(".") for line in lines if line.startswith("Machine: ")]
    if len(machine) != 1:
        raise ValueError(f"{source}: expected one 'Machine: ...' line (the CPU and oneDNN state), found {len(machine)}")
    written = next((line for line in lines if line.startswith("Written by ")), "")
    return Results(rows, machine[0], written)


def machine_title(machine):
    """'AMD EPYC, 2 cores; oneDNN on (...); CPU allocator: BFC (...)' and the flags, apart."""
    found = re.fullmatch(r"(.*?) \((.*?); (.*?)\)(; .*)?", machine)
    if found is None:
        return machine, ""
    cpu, architecture, flags, rest = found.groups()
    return f"{cpu}{rest or ''}", f"{architecture}: {flags}"


def draw(results, output):
    """Writes the chart of `results` (from `read_results`) to `output` as SVG."""
    import matplotlib

    # Text stays text (searchable, smaller); a fixed salt: the same SVG for the same table.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kerasbn"}):
        figure(results).savefig(output, format="svg", metadata={"Date": None})
    return output


def figure(results):
    """The chart as a matplotlib `Figure` (not drawn through pyplot: no global state)."""
    from matplotlib.figure import Figure

    rows = results.rows
    names = list(RATIO_COLUMNS)
    width = 0.8 / (len(names) + 1)
    chart = Figure(figsize=(max(8.0, 1.45 * len(rows) + 2), 6.2), layout="constrained")
    axes = chart.subplots()
    keras_x = [index - (len(names) / 2) * width for index in range(len(rows))]
    axes.bar(keras_x, [1.0] * len(rows), width, label="Keras BN (1 by definition)", color="#bbbbbb")
    highest = 1.0
    for position, name in enumerate(names):
        offset = (position + 1 - len(names) / 2) * width
        xs, values, errors = [], [], [[], []]
        for index, row in enumerate(rows):
            ratio = row.ratios[name]
            if ratio is None:
                continue
            xs.append(index + offset)
            values.append(ratio.value)
            low = ratio.value if ratio.low is None else ratio.low
            high = ratio.value if ratio.high is None else ratio.high
            errors[0].append(ratio.value - low)
            errors[1].append(high - ratio.value)
            highest = max(highest, high)
        floor = name.endswith("(floor)")
        axes.bar(
            xs, values, width, label=LABELS[name], color=COLORS[name],
            edgecolor="#555555" if floor else COLORS[name], hatch="//" if floor else None, linewidth=1,
        )
        axes.errorbar(xs, values, yerr=errors, fmt="none", ecolor="black", elinewidth=1, capsize=3)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(
        range(len(rows)),
        [f"{row.model.replace(', ', chr(10), 1)}\n{row.step}\nKeras {row.keras_ms:.0f} ms" for row in rows],
        fontsize=8,
    )
    axes.set_xlim(-0.6, len(rows) - 0.4)
    axes.set_ylim(0, highest * 1.12)
    axes.set_ylabel("Keras BN time ÷ variant's time (median)\nabove 1: faster than Keras BN")
    axes.set_xlabel("model, batch, input size; step (plain/jit: train_on_batch, predict: predict_on_batch)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", fontsize=8, ncols=2)
    where, flags = machine_title(results.machine)
    axes.set_title(
        "\n".join(["Whole models: speed relative to Keras BN, whiskers the 90% bootstrap interval", where]),
        fontsize=10,
    )
    caption = "; ".join(part for part in (flags, results.written) if part)
    if caption:
        chart.supxlabel(textwrap.fill(caption, 160), fontsize=6, color="#555555")
    return chart


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=DEFAULT_INPUT, help="results file (default benchmarks/results_models.md)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="SVG file (default benchmarks/results_models.svg)")
    args = parser.parse_args(argv)
    with open(args.input) as f:
        results = read_results(f.read(), args.input)
    draw(results, args.output)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
