"""A/B: one benchmark module on two commits, alternated, new ÷ old against old ÷ old.

    python -m benchmarks.ab --old HEAD~1 --new HEAD -- benchmarks.models --steps plain --models MobileNetV2
    python -m benchmarks.ab --old v1 --new . --repeats 4 --onednn 0 -- benchmarks.model_layers --quick

`--old` and `--new` are commits (each checked out with `git worktree add` in a
temporary directory, removed at the end) or directories holding a checkout
(used as they are). The command after `--` is a benchmark module and its
options; it runs `--repeats` times in each checkout, alternately old, new,
old, new, …, each time in a fresh process of this repository's venv Python
with `PYTHONPATH` and the working directory set to the checkout, so
`kerasbn` and `benchmarks` come from it (checked: each run prints where it
imported them from, and a run that imported them elsewhere is refused).
`--output FILE` is added to the command: the run's markdown report. A module
that writes no report but prints a JSON object (the one-measurement mode of
`benchmarks.first_calls`, `--case … --variant …`) is read from that instead.

Read from each run: every table column of times ("12 ms", "1.3 s", "0.25 ms
(1.10×)") and of peak memory (a header with "MiB"); a row is named by its
cells left of the first such column. Ratio columns are left out: they are
quotients of the times compared here. Per cell, with old_i and new_i the
values of the i-th old and new runs (each already a median over the
benchmark's rounds):

- new ÷ old = median(new_i) ÷ median(old_i), with its 90% bootstrap interval,
  runs resampled in alternated pairs (`timing.ratio_interval(paired=True)`);
- old ÷ old = the range of old_i ÷ old_j over all i ≠ j: how far two runs of
  the same code differ here (min(old) ÷ max(old) to its inverse);
- verdict: "within old's spread" when new ÷ old lies in that range, "faster"
  ("less memory") below it, "slower" ("more memory") above it.

`--control COLUMN` (e.g. `"Keras BN"`, code the change does not touch) compares
instead each time cell divided by the control column's cell of the same table,
row and run: the machine's drift between runs, which moves both columns of a
run alike, drops out. `--from-runs DIR` compares the reports an earlier A/B left
in DIR (`old-1.md`, `new-1.md`, ...) without running anything, e.g. again with
`--control`.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.timing import ratio_interval
from benchmarks.markdown_tables import tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGIN = "benchmarks.ab: imported from "
# Run in each child process: report where kerasbn and benchmarks come from,
# then run the benchmark module as `python -m` would.
CHILD = (
    "import runpy, sys, kerasbn, benchmarks\n"
    f"print({ORIGIN!r} + kerasbn.__file__ + ' ' + benchmarks.__file__, flush=True)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)
TIME = re.compile(r"(\d+(?:\.\d+)?) (ms|s)(?: \(.*\))?")
NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclasses.dataclass
class Cell:
    """One measured cell of the results, its value in every old and new run."""

    table: str
    row: str
    column: str
    unit: str  # 'ms', 's' or 'MiB'
    old: list = dataclasses.field(default_factory=list)
    new: list = dataclasses.field(default_factory=list)

    @property
    def ratio(self):
        return statistics.median(self.new) / statistics.median(self.old)

    @property
    def spread(self):
        """The range of old_i ÷ old_j, i ≠ j."""
        return min(self.old) / max(self.old), max(self.old) / min(self.old)

    @property
    def interval(self):
        return ratio_interval(self.new, self.old, paired=len(self.new) == len(self.old))

    @property
    def verdict(self):
        low, high = self.spread
        less, more = ("less memory", "more memory") if self.unit == "MiB" else ("faster", "slower")
        return less if self.ratio < low else more if self.ratio > high else "within old's spread"


def relative_to(run, control):
    """The time cells of one run's values divided by the `control` column's cell of the same
    table and row (unit "×", column "COLUMN ÷ CONTROL"); rows without the control are left out."""
    relative = {}
    for (table, row, column), (value, unit) in run.items():
        base = run.get((table, row, control))
        if column != control and unit in ("ms", "s") and base is not None and base[1] == unit:
            relative[(table, row, f"{column} ÷ {control}")] = (value / base[0], "×")
    return relative


def read_runs(directory):
    """`{"old": [...], "new": [...]}`: the values of the run reports an A/B left in `directory`
    (`old-1.md`, `new-1.md`, ..., or the JSON object of `old-1.log` where no report was written)."""
    runs = {"old": [], "new": []}
    for side in runs:
        for i in itertools.count(1):
            report, log = (os.path.join(directory, f"{side}-{i}.{ext}") for ext in ("md", "log"))
            if not os.path.exists(report) and not os.path.exists(log):
                break
            printed = ""
            if os.path.exists(log):
                with open(log) as f:
                    printed = f.read()
            runs[side].append(run_values(report, printed))
    if min(len(values) for values in runs.values()) < 2:
        raise SystemExit(f"--from-runs: {directory} holds fewer than two old and two new runs")
    return runs


def run_values(report, printed):
    """One run's values: its markdown report's (`measured_values`) when it wrote one, else those
    of the JSON object it printed (`printed_values`)."""
    if os.path.exists(report):
        with open(report) as f:
            return measured_values(f.read())
    return printed_values(printed)


def measured_values(text):
    """`{(table, row, column): (value, unit)}` of a markdown report's time and memory cells."""
    values = {}
    for heading, header, body in tables(text):
        units = [_column_unit(name, [row[i] for row in body if i < len(row)]) for i, name in enumerate(header)]
        if not any(units):
            continue
        first = next(i for i, unit in enumerate(units) if unit)
        table = f"{heading}: {header[0]}" if heading else header[0]
        for row in body:
            label = ", ".join(row[:first])
            for name, unit, cell in zip(header, units, row):
                if unit and cell != "n/a":
                    values[(table, label, name)] = (_value(cell, unit), unit)
    return values


def _column_unit(name, cells):
    """'ms' or 's' for a column of times, 'MiB' for one of memory, None otherwise."""
    cells = [cell for cell in cells if cell != "n/a"]
    if not cells:
        return None
    if "MiB" in name and all(NUMBER.fullmatch(cell) for cell in cells):
        return "MiB"
    times = [TIME.fullmatch(cell) for cell in cells]
    if all(times):
        return "ms" if all(found.group(2) == "ms" for found in times) else "s"
    return None


def _value(cell, unit):
    if unit == "MiB":
        return float(cell)
    number, cell_unit = TIME.fullmatch(cell).groups()
    seconds = float(number) * (1e-3 if cell_unit == "ms" else 1.0)
    return seconds * 1e3 if unit == "ms" else seconds


def printed_values(stdout):
    """`{("printed", "", field): (value, 's')}` from the last JSON object printed."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {}
    found = json.loads(lines[-1])
    return {("printed", "", k): (float(v), "s") for k, v in found.items() if isinstance(v, (int, float))}


def compare(old_runs, new_runs):
    """`Cell`s from the per-run values of `measured_values`; cells missing from
    a run, or with a value that is not positive, are left out (and returned
    as the second item, by name)."""
    cells, left_out = {}, set()
    for side, runs in (("old", old_runs), ("new", new_runs)):
        for run in runs:
            for key, (value, unit) in run.items():
                cell = cells.setdefault(key, Cell(*key, unit))
                getattr(cell, side).append(value)
    complete = []
    for key, cell in cells.items():
        if len(cell.old) == len(old_runs) and len(cell.new) == len(new_runs) and min(cell.old + cell.new) > 0:
            complete.append(cell)
        else:
            left_out.add(" / ".join(k for k in key if k))
    return complete, sorted(left_out)


def render(cells, repeats):
    """Markdown: one table per results table, then the verdict counts and what was slower."""
    lines = []
    for table in dict.fromkeys(cell.table for cell in cells):
        lines += [
            f"### {table}",
            "",
            f"| row | column | old (median of {repeats}) | new (median of {repeats}) "
            "| new ÷ old (90% interval) | old ÷ old spread | verdict |",
            "|---" * 7 + "|",
        ]
        for cell in (c for c in cells if c.table == table):
            low, high = cell.interval
            lines.append(
                f"| {cell.row or '—'} | {cell.column} | {_amount(statistics.median(cell.old), cell.unit)} "
                f"| {_amount(statistics.median(cell.new), cell.unit)} "
                f"| {cell.ratio:.3f} ({low:.3f}–{high:.3f}) "
                f"| {cell.spread[0]:.3f}–{cell.spread[1]:.3f} | {cell.verdict} |"
            )
        lines.append("")
    counts = {}
    for cell in cells:
        counts[cell.verdict] = counts.get(cell.verdict, 0) + 1
    lines.append("Verdicts: " + ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items())) + ".")
    for cell in cells:
        if cell.verdict in ("slower", "more memory"):
            lines.append(
                f"- {cell.verdict}: {cell.table} / {cell.row} / {cell.column}: new ÷ old {cell.ratio:.3f}, "
                f"{(cell.ratio / cell.spread[1] - 1) * 100:.1f}% above old's spread "
                f"({(cell.ratio - 1) * 100:+.1f}% on old's median)"
            )
    return "\n".join(lines) + "\n"


def _amount(value, unit):
    if unit == "×":
        return f"{value:.3f}×"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


# -- running ------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="commit, or directory of a checkout (required unless --from-runs)")
    parser.add_argument("--new", help="commit, or directory of a checkout (required unless --from-runs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternated (at least 2)")
    parser.add_argument("--rounds", type=int, default=None, help="passed to the module as --rounds N")
    parser.add_argument("--onednn", choices=("0", "1"), default=None, help="TF_ENABLE_ONEDNN_OPTS of the runs")
    parser.add_argument("--runs", default=None, help="directory for each run's report and log (default: a new temporary one)")
    parser.add_argument("--output", default=None, help="also write the comparison to this markdown file")
    parser.add_argument("--control", default=None, help="column to divide each time cell by, per run")
    parser.add_argument("--from-runs", default=None, help="compare the run reports an A/B left here")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.command = argv[split + 1 :]
    if args.from_runs is not None:
        if not os.path.isdir(args.from_runs):
            parser.error(f"--from-runs: {args.from_runs!r} is not a directory")
        return args
    if args.old is None or args.new is None:
        parser.error("--old and --new are required (or --from-runs)")
    if split == len(argv):
        parser.error("give the benchmark after `--`, e.g. `-- benchmarks.models --quick`")
    if not args.command or args.command[0].startswith("-"):
        parser.error("after `--`: a benchmark module first, e.g. `benchmarks.models`, then its options")
    if "--output" in args.command or any(a.startswith("--output=") for a in args.command):
        parser.error("after `--`: leave out --output, each run's report goes to --runs")
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (old ÷ old needs two old runs), got {args.repeats}")
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, got {args.rounds}")
        if "--rounds" in args.command:
            parser.error("--rounds given twice: before and after `--`")
        args.command += ["--rounds", str(args.rounds)]
    return args


@contextlib.contextmanager
def checkout(spec, option, where):
    """The directory of `spec` (a directory as it is, or a commit checked out under `where`)."""
    if os.path.isdir(spec):
        yield os.path.realpath(spec)
        return
    found = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet", spec + "^{commit}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"{option}: {spec!r} is neither a directory nor a commit of {REPO}")
    path = os.path.join(where, option.strip("-"))
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", path, found.stdout.strip()],
                   check=True, capture_output=True)
    try:
        yield os.path.realpath(path)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path], capture_output=True)


def run_once(name, directory, command, runs, onednn):
    """Runs the benchmark in `directory` once; its values (`measured_values` or `printed_values`)."""
    report, log = os.path.join(runs, f"{name}.md"), os.path.join(runs, f"{name}.log")
    env = dict(os.environ, PYTHONPATH=directory, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    python = os.path.join(REPO, ".venv", "bin", "python")
    python = python if os.path.exists(python) else sys.executable
    start = time.perf_counter()
    done = subprocess.run([python, "-c", CHILD, *command, "--output", report],
                          cwd=directory, env=env, capture_output=True, text=True)
    with open(log, "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}), log {log}:\n{done.stderr[-2000:]}")
    origins = [line[len(ORIGIN):].split() for line in done.stdout.splitlines() if line.startswith(ORIGIN)]
    if not origins or not all(path.startswith(directory + os.sep) for path in origins[0]):
        raise SystemExit(f"{name} imported kerasbn/benchmarks from {origins}, not from {directory}")
    values = run_values(report, done.stdout)
    if not values:
        raise SystemExit(f"{name}: no time or memory column in {report}, nor a JSON object printed")
    print(f"{name}: {time.perf_counter() - start:.0f} s, kerasbn from {origins[0][0]}", flush=True)
    return values


def machine_lines(runs):
    """The distinct 'Machine: …' lines of the run reports."""
    found = []
    for name in sorted(os.listdir(runs)):
        if name.endswith(".md"):
            with open(os.path.join(runs, name)) as f:
                found += [line for line in f.read().splitlines() if line.startswith("Machine:")]
    return list(dict.fromkeys(found))


def main(argv=None):
    args = parse_args(argv)
    if args.from_runs is not None:
        runs, results = args.from_runs, read_runs(args.from_runs)
        command = f"`python -m benchmarks.ab --from-runs {runs}"
    else:
        runs = args.runs or tempfile.mkdtemp(prefix="kerasbn-ab-")
        os.makedirs(runs, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kerasbn-ab-trees-") as trees, \
                checkout(args.old, "--old", trees) as old, checkout(args.new, "--new", trees) as new:
            results = {"old": [], "new": []}
            for i in range(1, args.repeats + 1):
                for side, directory in (("old", old), ("new", new)):
                    results[side].append(run_once(f"{side}-{i}", directory, args.command, runs, args.onednn))
        command = (
            f"`python -m benchmarks.ab --old {args.old} --new {args.new} --repeats {args.repeats}"
            + (f" --onednn {args.onednn}" if args.onednn else "") + " -- " + " ".join(args.command)
        )
    if args.control is not None:
        results = {side: [relative_to(run, args.control) for run in values] for side, values in results.items()}
        if not any(results["old"]):
            raise SystemExit(f"--control: no time column named {args.control!r} in the run reports")
        command += f"` with `--control {args.control!r}"
    cells, left_out = compare(results["old"], results["new"])
    header = [command + "`", "", *machine_lines(runs), ""]
    text = "\n".join(header) + "\n" + render(cells, len(results["old"]))
    if left_out:
        text += "Not in every run (left out): " + "; ".join(left_out) + "\n"
    print(text + f"\nEach run's report and log: {runs}")
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
