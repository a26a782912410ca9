"""`benchmarks.chart`: the whole-model table as an SVG, and refusals of malformed tables.

Reference: the markdown table itself (written here, or by `benchmarks.models`
for the committed results file): every bar and whisker must be a number of
the table.
"""

import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
chart = pytest.importorskip("benchmarks.chart")

ROOT = Path(__file__).resolve().parent.parent
HEADER = (
    "| model, batch, input | step | Keras BN | kerasbn | kerasbn + act. | no normalization "
    "| Keras ÷ kerasbn | Keras ÷ kerasbn + act. | Keras ÷ floor |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
ROWS = (
    "| TinyNet, 8, 32×32 | plain | 200 ms | 160 ms | 150 ms | 100 ms "
    "| 1.25× (1.10–1.40) | 1.33× (1.20–1.45) | 2.00× (1.90–2.10) |\n"
    "| TinyNet, 8, 32×32 | predict | 50 ms | 55 ms | n/a | 40 ms | 0.91× (0.80–1.02) | n/a | 1.25× |\n"
    "| WideNet, 4, 64×64 | plain | 300 ms | 250 ms | 240 ms | 200 ms "
    "| 1.20× (1.05–1.31) | 1.25× (1.12–1.38) | 1.50× (1.41–1.62) |\n"
)
MACHINE = (
    "Machine: Test CPU 9000, 2 cores (x86_64; avx avx2 fma); oneDNN off "
    "(TF_ENABLE_ONEDNN_OPTS=0); CPU allocator: TensorFlow's default.\n"
)
WRITTEN = "Written by `python -m benchmarks.models --rounds 6` on 2031-01-02 03:04: TensorFlow 9.9.\n"


def results_file(tmp_path, body=HEADER + ROWS, machine=MACHINE):
    path = tmp_path / "results_models.md"
    path.write_text(f"# End-to-end benchmark: whole models\n\n{WRITTEN}\n{machine}\n## Training step\n\n{body}")
    return path


def test_the_chart_is_written_with_every_model_and_the_machine(tmp_path):
    output = tmp_path / "chart.svg"
    assert chart.main(["--input", str(results_file(tmp_path)), "--output", str(output)]) == 0
    svg = output.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for text in ("TinyNet", "WideNet", "Test CPU 9000", "oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", "2031-01-02 03:04"):
        assert text in svg, text


def test_bars_and_whiskers_are_the_tables_ratios(tmp_path):
    results = chart.read_results(results_file(tmp_path).read_text())
    assert [(row.model, row.step, row.keras_ms) for row in results.rows] == [
        ("TinyNet, 8, 32×32", "plain", 200.0),
        ("TinyNet, 8, 32×32", "predict", 50.0),
        ("WideNet, 4, 64×64", "plain", 300.0),
    ]
    axes = chart.figure(results).axes[0]
    bars = {container.get_label(): [patch.get_height() for patch in container] for container in axes.containers
            if hasattr(container, "patches")}
    assert bars == {
        "Keras BN (1 by definition)": [1.0, 1.0, 1.0],
        "kerasbn": [1.25, 0.91, 1.20],
        "kerasbn + act. (fused activations)": [1.33, 1.25],  # 'n/a': no bar
        "no normalization (the floor)": [2.00, 1.25, 1.50],
    }
    whiskers = sorted(
        tuple(round(y, 6) for y in segment[:, 1])
        for collection in axes.collections
        for segment in collection.get_segments()
    )
    expected = [(1.10, 1.40), (1.20, 1.45), (1.90, 2.10), (0.80, 1.02), (1.25, 1.25), (1.05, 1.31),
                (1.12, 1.38), (1.41, 1.62)]  # '1.25×' without an interval: a whisker of length 0
    assert whiskers == sorted(expected)


@pytest.mark.parametrize(
    "body, machine, message",
    [
        ("no table here\n", MACHINE, "no markdown table whose header starts with 'model, batch, input'"),
        (HEADER.replace("|---|---|", "|-|-|", 1) + ROWS, MACHINE, "separator"),
        (HEADER.replace(" | Keras ÷ floor", " | floor"), MACHINE, "no column"),
        (HEADER, MACHINE, "no rows"),
        (HEADER + ROWS.replace("1.25× (1.10–1.40)", "1.25x", 1), MACHINE, "row 1, Keras ÷ kerasbn: '1.25x'"),
        (HEADER + ROWS.replace("1.40) |", "1.40) | 3 |", 1), MACHINE, "row 1: 10 cells, the header has 9"),
        (HEADER + ROWS.replace("1.10–1.40", "1.40–1.10", 1), MACHINE, "low end above its high end"),
        (HEADER + ROWS.replace("200 ms", "fast", 1), MACHINE, "Keras BN time 'fast'"),
        (HEADER + ROWS, "", "Machine"),
    ],
    ids=["no table", "separator", "column", "no rows", "ratio", "width", "interval", "time", "machine"],
)
def test_a_malformed_table_is_refused_with_a_clear_value_error(tmp_path, body, machine, message):
    path = results_file(tmp_path, body, machine)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
        chart.main(["--input", str(path), "--output", str(tmp_path / "chart.svg")])
    assert not (tmp_path / "chart.svg").exists()


def test_the_committed_table_and_chart_agree():
    """The file `benchmarks.models` wrote parses, and the committed SVG was drawn from it."""
    text = (ROOT / "benchmarks" / "results_models.md").read_text()
    results = chart.read_results(text)
    assert {row.step for row in results.rows} <= {"plain", "jit", "predict"}
    svg = (ROOT / "benchmarks" / "results_models.svg").read_text()
    for row in results.rows:
        assert row.model.split(",")[0] in svg and f"Keras {row.keras_ms:.0f} ms" in svg, row
    written = next(line for line in text.splitlines() if line.startswith("Written by "))
    date = re.search(r" on (\d{4}-\d\d-\d\d \d\d:\d\d)", written).group(1)
    assert date in svg, f"the SVG was not drawn from this file ({date})"
