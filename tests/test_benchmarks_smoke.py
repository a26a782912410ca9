"""The benchmark harness runs end to end (`--quick`: tiny shapes) and writes its tables."""

import re

import pytest
from benchmarks.markdown_tables import table

run = pytest.importorskip("benchmarks.run")
cases = pytest.importorskip("benchmarks.cases")
peak_memory = pytest.importorskip("benchmarks.peak_memory")
platform_info = pytest.importorskip("benchmarks.platform_info")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "results.md"
    assert run.main(["--quick", "--output", str(output)]) == 0
    return output.read_text()


def test_training_table_has_every_layer_and_shape_with_floor_ratios(quick_results):
    header, body = table(quick_results, "training step")
    assert header[1:] == [shape.label for shape in cases.QUICK_SHAPES]
    titles = [row[0] for row in body]
    assert run.COPY in titles
    for spec in run.available_specs():
        assert spec.title in titles
    for row in body:
        assert len(row) == len(header)
        for cell in row[1:]:
            assert re.fullmatch(r"[\d.]+ ms \([\d.]+×\)", cell), cell


def test_ratio_tables_compare_ours_with_each_anchor(quick_results):
    for kind in ("training", "inference"):
        header, body = table(quick_results, f"speed-up (anchor ÷ ours), {kind}")
        labels = [row[0] for row in body]
        assert "tf_keras fused BN ÷ ours BN" in labels
        assert "Keras 3 BN, jit ÷ ours BN, jit" in labels
        for row in body:
            assert len(row) == len(header)
            for cell in row[1:]:
                assert re.fullmatch(r"[\d.]+×", cell), cell


def test_inference_compile_memory_and_targets_are_reported(quick_results):
    header, body = table(quick_results, "inference")
    assert run.AFFINE in [row[0] for row in body]
    _, compile_rows = table(quick_results, "first call − steady call")
    assert all(re.fullmatch(r"[\d.]+ / [\d.]+", cell) for row in compile_rows for cell in row[1:])
    _, memory_rows = table(quick_results, "training-step peak memory")
    memory = {row[0]: row for row in memory_rows}
    assert set(memory) == {"ours BN", "tf_keras fused BN"}
    for row in memory.values():
        # A training step returns dx, as large as x: at least one input's size.
        assert 1.0 <= float(row[2]) < 20.0, row
    assert "## Targets" in quick_results


def test_header_records_the_platform_and_the_memory_method(quick_results):
    (machine,) = [line for line in quick_results.splitlines() if line.startswith("Machine: ")]
    assert platform_info.cpu_model() in machine
    onednn = {True: "oneDNN on", False: "oneDNN off"}[platform_info.onednn_enabled()]
    assert onednn in machine and "CPU allocator: " in machine
    bfc = platform_info.bfc_allocator()
    assert ("CPU allocator: BFC" in machine) == bfc
    method = peak_memory.METHODS[peak_memory.BFC if bfc else peak_memory.RSS]
    assert f"Method: {method}." in quick_results


def test_platform_flags_name_the_vector_extensions_tensorflow_uses():
    flags = platform_info.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this machine: nothing to compare with")
    with open("/proc/cpuinfo") as f:
        listed = set(next(line for line in f if line.startswith(("flags", "Features"))).split())
    assert set(flags) <= listed
    assert ("avx2" in listed) == ("avx2" in flags)
    assert all(flag.startswith(("avx", "fma", "f16c", "amx")) for flag in flags)


def test_end_to_end_quick_run_writes_the_model_table_and_targets(tmp_path):
    """Two of the four variants (each whole model costs its tracing): the
    others show as n/a; building every variant is tested below."""
    models = pytest.importorskip("benchmarks.models")
    output = tmp_path / "models.md"
    assert models.main(["--quick", "--variants", "keras,kerasbn_fused", "--output", str(output)]) == 0
    text = output.read_text()
    header, body = table(text, "model, batch, input")
    assert header[2:6] == [models.TITLES[v] for v in models.VARIANTS]
    kinds = [row[1] for row in body]
    assert kinds == ["plain", "predict"]
    for row in body:
        assert len(row) == len(header)
        keras_ms, kerasbn_ms, fused_ms, floor_ms = row[2:6]
        assert re.fullmatch(r"\d+ ms", keras_ms) and re.fullmatch(r"\d+ ms", fused_ms), row
        assert kerasbn_ms == floor_ms == "n/a", row
        assert re.fullmatch(r"[\d.]+×", row[7]), row  # one round: no interval
        assert row[6] == row[8] == "n/a", row
    assert "Machine: " in text and "oneDNN" in text
    header, (row,) = table(text.split("## Peak memory")[1], "model, batch, input")
    assert header[1:] == [models.TITLES["keras"], models.TITLES["kerasbn_fused"]]
    assert re.fullmatch(r"\d+ MiB \(1\.00×\)", row[1]), row  # Keras BN ÷ itself
    assert re.fullmatch(r"\d+ MiB \([\d.]+×\)", row[2]), row
    target = next(line for line in text.splitlines() if "MobileNetV2 plain step" in line)
    assert target.endswith("**not judged: 1 rounds**"), target


def test_end_to_end_variants_are_the_same_network_with_other_normalizations():
    models = pytest.importorskip("benchmarks.models")
    import keras

    import kerasbn

    case = models.QUICK_MODELS[0]
    built = {variant: models.build(case, variant) for variant in models.VARIANTS}
    keras_norms = (keras.layers.BatchNormalization, keras.layers.GroupNormalization)
    ours = (kerasbn.BatchNorm, kerasbn.BatchRenorm, kerasbn.GroupNorm)
    count = sum(isinstance(layer, keras_norms) for layer in built["keras"].layers)
    assert count > 0
    assert sum(isinstance(layer, ours) for layer in built["kerasbn"].layers) == count
    assert sum(isinstance(layer, ours) for layer in built["kerasbn_fused"].layers) == count
    assert sum(isinstance(layer, models.NoNormalization) for layer in built["floor"].layers) == count
    for variant in ("kerasbn", "floor"):
        assert not any(isinstance(layer, keras_norms) for layer in built[variant].layers)
        assert len(built[variant].layers) == len(built["keras"].layers)
    assert len(built["kerasbn_fused"].layers) < len(built["keras"].layers)  # activations fused


def test_first_calls_tables_report_medians_ratios_and_verdicts():
    first_calls = pytest.importorskip("benchmarks.first_calls")
    results = {
        (case, variant): [seconds, seconds + 2.0]
        for case in first_calls.CASES
        for variant, seconds in zip(first_calls.VARIANTS, (10.0, 11.0, 20.0, 40.0))
    }
    _, body = table("\n".join(first_calls.table(results)), "new shapes")
    assert [row[1:] for row in body] == [["11.0 s", "12.0 s", "21.0 s", "41.0 s", "1.09×", "1.95×"]] * len(
        first_calls.CASES
    )
    verdicts = first_calls.target_lines(results)
    assert any("kerasbn time ÷ Keras BN: 1.09× (target ≤ 1.2×) — **met**" in line for line in verdicts)
    assert any("kerasbn GN time ÷ Keras GN: 1.95× (target ≤ 1.5×) — **NOT met**" in line for line in verdicts)


def test_the_runs_leave_the_xla_policy_as_they_found_it(quick_results, tmp_path):
    """Each run sets its own XLA policy; a caller in the same process keeps its own."""
    import kerasbn

    models = pytest.importorskip("benchmarks.models")
    before = kerasbn.kernels.get_xla_policy()
    assert before["warmup_calls"] not in (0, models.WARMUP_CALLS)  # the runs' values
    assert run.main(["--quick", "--output", str(tmp_path / "results.md")]) == 0
    assert kerasbn.kernels.get_xla_policy() == before
    assert models.main(["--quick", "--variants", "keras,kerasbn", "--output", str(tmp_path / "m.md")]) == 0
    assert kerasbn.kernels.get_xla_policy() == before
