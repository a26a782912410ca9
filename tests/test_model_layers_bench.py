"""`benchmarks.model_layers`: a model's normalization layers timed one by one."""

import re

import numpy as np
import pytest
from benchmarks.markdown_tables import table

model_layers = pytest.importorskip("benchmarks.model_layers")
models = pytest.importorskip("benchmarks.models")


def test_the_prediction_and_the_fraction_needed_invert_each_other():
    floor_ratio = 1.77
    for target in (1.0, 1.15, 1.3, 1.6):
        needed = model_layers.fraction_needed(floor_ratio, target)
        assert model_layers.predicted_speedup(floor_ratio, needed) == pytest.approx(target)
    # Free normalization reaches the floor; Keras' own cost gives Keras' speed.
    assert model_layers.predicted_speedup(floor_ratio, 0.0) == pytest.approx(floor_ratio)
    assert model_layers.predicted_speedup(floor_ratio, 1.0) == pytest.approx(1.0)
    # Beyond the floor no fraction will do; without a floor gain, nothing to predict.
    assert model_layers.fraction_needed(floor_ratio, 1.8) < 0
    assert model_layers.fraction_needed(1.0, 1.15) is None
    assert model_layers.fraction_needed(0.97, 1.15) is None


def test_the_cost_fraction_subtracts_what_the_activation_costs_alone():
    activation = np.full(7, 2.0)
    keras = activation + 3.0
    ours = activation + 1.2
    assert model_layers.cost_fraction(keras, ours, activation) == pytest.approx(0.4)
    # Keras' normalization free or faster than the activation alone: no fraction.
    assert np.isnan(model_layers.cost_fraction(activation, ours, activation))


def test_the_model_inputs_are_every_normalization_with_its_fused_activation():
    import keras

    case = models.QUICK_MODELS[0]
    inputs = model_layers.layer_inputs(case)
    model = models.build(case, "keras")
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert sum(layer_input.count for layer_input in inputs) == len(norms)
    assert len({(i.shape, i.activation) for i in inputs}) == len(inputs)
    assert all(i.shape[0] == case.batch for i in inputs)
    # MobileNetV2: relu6 after most, nothing after the projections.
    assert {i.activation for i in inputs} == {"relu6", None}
    assert {i.epsilon for i in inputs} == {norms[0].epsilon}


@pytest.mark.parametrize("activation", ["relu6", None])
def test_the_timed_steps_compute_the_same_gradients(activation):
    """Keras' BN + activation and ours fused are the same training step."""
    layer_input = model_layers.LayerInput((4, 3, 3, 8), activation, 1e-3, 0.99, 1)
    keras_grads = model_layers.layer_step("keras", layer_input)()
    ours_grads = model_layers.layer_step("ours", layer_input)()
    assert len(keras_grads) == len(ours_grads) == 3  # dx, dγ, dβ
    for mine, theirs in zip(ours_grads, keras_grads, strict=True):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-4)
    (dx,) = model_layers.layer_step("activation", layer_input)()
    assert dx.shape == layer_input.shape


def test_an_unknown_kind_is_named():
    layer_input = model_layers.LayerInput((2, 2, 2, 2), None, 1e-3, 0.99, 1)
    with pytest.raises(ValueError, match="`kind`"):
        model_layers.layer_step("tf_keras", layer_input)


def test_quick_run_writes_the_summary_and_one_row_per_input(tmp_path):
    output = tmp_path / "layers.md"
    assert model_layers.main(["--quick", "--output", str(output)]) == 0
    text = output.read_text()
    assert "Machine: " in text and "oneDNN" in text
    header, (row,) = table(text, "model, batch, input")
    assert len(row) == len(header) == 10
    case = models.QUICK_MODELS[0]
    inputs = model_layers.layer_inputs(case)
    assert row[0] == case.label
    assert row[1] == f"{sum(i.count for i in inputs)} ({len(inputs)})"
    assert all(re.fullmatch(r"[\d.]+ ms", cell) for cell in row[2:5]), row
    assert re.fullmatch(r"-?[\d.]+", row[5]), row  # one round: no interval
    assert re.fullmatch(r"[\d.]+×", row[6]) and re.fullmatch(r"[\d.]+×", row[7]), row
    assert re.fullmatch(r"[\d.]+×", row[8]), row
    assert re.fullmatch(r"≥ 1\.3×: (p ≤ [\d.]+|out of reach \(floor [\d.]+×\))", row[9]), row
    detail_header, detail = table(text, "input, activation")
    assert [r[0] for r in detail] == [i.label for i in inputs]
    assert all(len(r) == len(detail_header) for r in detail)


@pytest.mark.parametrize("module", [model_layers, models])
def test_bad_options_are_refused_before_any_timing(capsys, module):
    with pytest.raises(SystemExit):
        module.main(["--models", "NoSuchNet"])
    assert "--models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--rounds", "0"])
    assert "--rounds" in capsys.readouterr().err


def test_the_needed_fraction_reads_out_of_reach_past_the_floor():
    assert model_layers._needed_text(1.2, 1.3) == "≥ 1.3×: out of reach (floor 1.20×)"
    assert model_layers._needed_text(2.0, 1.25) == "≥ 1.25×: p ≤ 0.60"
    assert model_layers._needed_text(0.98, 1.15).endswith("n/a (floor not faster than Keras)")
    assert model_layers._needed_text(1.5, None) == "n/a"
