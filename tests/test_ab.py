"""`benchmarks.ab`: reading run reports, new ÷ old against old ÷ old, verdicts,
refused arguments, and the alternated runs on two stand-in checkouts (a
`kerasbn` and a benchmark module of a few lines, no TensorFlow)."""

import subprocess
import textwrap
from pathlib import Path

import pytest

ab = pytest.importorskip("benchmarks.ab")

ROOT = Path(__file__).resolve().parent.parent


def models_report(keras_ms, ours_ms):
    return textwrap.dedent(f"""\
        # End-to-end benchmark: whole models

        Machine: Test CPU, 2 cores; oneDNN off (TF_ENABLE_ONEDNN_OPTS=0).

        ## Training step and inference (median)

        | model, batch, input | step | Keras BN | kerasbn | Keras ÷ kerasbn |
        |---|---|---|---|---|
        | TinyNet, 8, 32×32 | plain | {keras_ms} ms | {ours_ms} ms | 1.25× (1.10–1.40) |
        | TinyNet, 8, 32×32 | predict | 50 ms | n/a | n/a |
        """)


LAYERS_REPORT = """\
## Training step (median, × copy-of-x floor)

| training step | 8×4×4×16 | 64×56×56×64 |
|---|---|---|
| ours BN | 0.25 ms (1.10×) | 12.5 ms (2.00×) |

## Compile time of the first call

| first call − steady call (s), train / infer | 8×4×4×16 |
|---|---|
| ours BN | 0.12 / 0.34 |

## Peak memory of a training step

| training-step peak memory, 64×56×56×64 | MiB over resident | × input size | ÷ fused |
|---|---|---|---|
| ours BN | 49.0 | 1.00 | 1.00× |
"""


def test_time_and_memory_columns_are_read_and_ratios_and_compile_times_are_not():
    values = ab.measured_values(models_report(200, 160) + "\n" + LAYERS_REPORT)
    table = "Training step and inference (median): model, batch, input"
    assert values[(table, "TinyNet, 8, 32×32, plain", "Keras BN")] == (200.0, "ms")
    assert values[(table, "TinyNet, 8, 32×32, plain", "kerasbn")] == (160.0, "ms")
    assert values[(table, "TinyNet, 8, 32×32, predict", "Keras BN")] == (50.0, "ms")
    steps = "Training step (median, × copy-of-x floor): training step"
    assert values[(steps, "ours BN", "8×4×4×16")] == (0.25, "ms")
    memory = "Peak memory of a training step: training-step peak memory, 64×56×56×64"
    assert values[(memory, "ours BN", "MiB over resident")] == (49.0, "MiB")
    assert len(values) == 6  # no n/a, no ratio column, no compile times


def test_seconds_and_a_printed_json_object():
    values = ab.measured_values(
        "| new shapes | Keras BN | kerasbn |\n|---|---|---|\n| predict | 12.5 s | 900 ms |\n| fit | 900 ms | 1.5 s |\n"
    )
    assert values[("new shapes", "predict", "Keras BN")] == (12.5, "s")
    assert values[("new shapes", "predict", "kerasbn")] == (0.9, "s")  # a column has one unit
    assert values[("new shapes", "fit", "Keras BN")] == (0.9, "s")
    assert ab.printed_values("loading\n{\"seconds\": 3.5}\n") == {("printed", "", "seconds"): (3.5, "s")}


def test_ratio_spread_and_verdicts():
    old = [ab.measured_values(models_report(200, ms)) for ms in (100, 110, 105)]
    faster = [ab.measured_values(models_report(200, ms)) for ms in (80, 85, 82)]
    cells, left_out = ab.compare(old, faster)
    assert left_out == []
    by_column = {(c.row.split(", ")[-1], c.column): c for c in cells}
    ours = by_column[("plain", "kerasbn")]
    assert ours.ratio == pytest.approx(82 / 105)
    assert ours.spread == pytest.approx((100 / 110, 110 / 100))
    assert ours.verdict == "faster"
    assert by_column[("plain", "Keras BN")].verdict == "within old's spread"
    slower = [ab.measured_values(models_report(200, ms)) for ms in (130, 125, 128)]
    cells, _ = ab.compare(old, slower)
    assert {c.verdict for c in cells if c.column == "kerasbn"} == {"slower"}
    text = ab.render(cells, 3)
    assert "| TinyNet, 8, 32×32, plain | kerasbn | 105 ms | 128 ms | 1.219 (" in text
    assert "0.909–1.100 | slower |" in text
    assert "slower: " in text and "10.8% above old's spread" in text


def test_memory_verdicts_and_cells_missing_from_a_run():
    def report(mib):
        return LAYERS_REPORT.replace("| 49.0 |", f"| {mib} |")

    cells, left_out = ab.compare([ab.measured_values(report(m)) for m in (49.0, 50.0)],
                                 [ab.measured_values(report(m)) for m in (60.0, 61.0)])
    memory = [c for c in cells if c.unit == "MiB"]
    assert [c.verdict for c in memory] == ["more memory"]
    old = [ab.measured_values(models_report(200, 100)), {}]
    cells, left_out = ab.compare(old, old)
    assert cells == [] and any("kerasbn" in name for name in left_out)


def test_control_column_takes_out_drift_that_moves_a_whole_run():
    """Runs twice as slow overall (the machine, not the code) leave each cell ÷ its control alone."""
    old = [ab.measured_values(models_report(k, o)) for k, o in ((100, 80), (200, 160))]
    new = [ab.measured_values(models_report(k, o)) for k, o in ((200, 160), (100, 80))]
    relative = [ab.relative_to(run, "Keras BN") for run in old]
    assert relative[0] == {("Training step and inference (median): model, batch, input", "TinyNet, 8, 32×32, plain",
                            "kerasbn ÷ Keras BN"): (0.8, "×")}
    (cell,), _ = ab.compare(relative, [ab.relative_to(run, "Keras BN") for run in new])
    assert (cell.ratio, cell.verdict) == (1.0, "within old's spread")
    (slower,), _ = ab.compare(relative, [ab.relative_to(ab.measured_values(models_report(100, 90)), "Keras BN")] * 2)
    assert slower.verdict == "slower" and slower.ratio == pytest.approx(0.9 / 0.8)


def test_from_runs_compares_reports_left_by_an_earlier_ab(tmp_path, capsys):
    for name, (keras_ms, ours_ms) in {"old-1": (100, 80), "new-1": (200, 160), "old-2": (200, 160),
                                      "new-2": (100, 80)}.items():
        (tmp_path / f"{name}.md").write_text(models_report(keras_ms, ours_ms))
    output = tmp_path / "again.md"
    assert ab.main(["--from-runs", str(tmp_path), "--control", "Keras BN", "--output", str(output)]) == 0
    text = output.read_text()
    assert "| TinyNet, 8, 32×32, plain | kerasbn ÷ Keras BN | 0.800× | 0.800× | 1.000" in text
    assert "--control 'Keras BN'" in text
    with pytest.raises(SystemExit, match="no time column named 'Keras'"):
        ab.main(["--from-runs", str(tmp_path), "--control", "Keras"])
    (tmp_path / "new-2.md").unlink()
    with pytest.raises(SystemExit, match="fewer than two old and two new runs"):
        ab.main(["--from-runs", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--old", "a", "--new", "b"], "after `--`"),
        (["--old", "a", "--new", "b", "--"], "a benchmark module first"),
        (["--old", "a", "--new", "b", "--repeats", "1", "--", "benchmarks.models"], "--repeats must be at least 2"),
        (["--old", "a", "--new", "b", "--", "benchmarks.models", "--output", "x.md"], "leave out --output"),
        (["--old", "a", "--new", "b", "--rounds", "0", "--", "benchmarks.models"], "--rounds must be at least 1"),
        (["--old", "a", "--new", "b", "--rounds", "2", "--", "benchmarks.models", "--rounds", "3"], "--rounds given twice"),
        (["--old", "a", "--new", "b", "--onednn", "2", "--", "benchmarks.models"], "--onednn"),
        (["--new", "b", "--", "benchmarks.models"], "--old and --new are required"),
        (["--from-runs", "/nonexistent/runs"], "is not a directory"),
    ],
)
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        ab.parse_args(argv)
    assert message in capsys.readouterr().err


def test_an_unknown_commit_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="--old: 'no-such-commit-xyz' is neither"):
        ab.main(["--old", "no-such-commit-xyz", "--new", "HEAD", "--runs", str(tmp_path), "--", "benchmarks.models"])


def test_a_commit_is_checked_out_in_a_worktree_and_removed(tmp_path):
    with ab.checkout("HEAD", "--old", str(tmp_path)) as path:
        assert (Path(path) / "kerasbn" / "__init__.py").is_file()
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert not (tmp_path / "old").exists() and str(tmp_path) not in listed


def stand_in(directory, milliseconds):
    """A checkout with a `kerasbn` and a `benchmarks.fake` writing one time."""
    (directory / "kerasbn").mkdir(parents=True)
    (directory / "kerasbn" / "__init__.py").write_text("")
    (directory / "benchmarks").mkdir()
    (directory / "benchmarks" / "__init__.py").write_text("")
    (directory / "benchmarks" / "fake.py").write_text(textwrap.dedent(f"""\
        import sys
        output = sys.argv[sys.argv.index("--output") + 1]
        with open(output, "w") as f:
            f.write("Machine: stand-in.\\n\\n| case | time |\\n|---|---|\\n| step | {milliseconds} ms |\\n")
        """))
    return directory


def test_runs_alternate_in_the_checkouts_and_are_compared(tmp_path, capsys):
    old, new = stand_in(tmp_path / "old", 100), stand_in(tmp_path / "new", 150)
    runs, output = tmp_path / "runs", tmp_path / "ab.md"
    argv = ["--old", str(old), "--new", str(new), "--runs", str(runs), "--output", str(output), "--", "benchmarks.fake"]
    assert ab.main(argv) == 0
    printed = capsys.readouterr().out
    order = [line.split(":")[0] for line in printed.splitlines() if line.startswith(("old-", "new-"))]
    assert order == ["old-1", "new-1", "old-2", "new-2", "old-3", "new-3"]
    assert f"kerasbn from {old}" in printed and f"kerasbn from {new}" in printed
    text = output.read_text()
    assert "| step | time | 100 ms | 150 ms | 1.500 (1.500–1.500) | 1.000–1.000 | slower |" in text
    assert "Machine: stand-in." in text
    assert sorted(p.name for p in runs.iterdir())[:2] == ["new-1.log", "new-1.md"]
