"""The `make demo` program trains to a useful accuracy, its statistics are sane,
and it exports a SavedModel that serves the trained model's predictions."""

import json
import re

import numpy as np
import tensorflow as tf

from kerasbn import demo


def test_demo_trains_and_moving_statistics_approach_population(capsys, tmp_path):
    export_dir = tmp_path / "digits" / "1"
    model, accuracy = demo.main(["--epochs", "8", "--export-dir", str(export_dir)])
    assert accuracy > 0.85
    out = capsys.readouterr().out
    assert "test accuracy" in out and "true mean" in out
    x_train = demo.load_digits_split()[0][0]
    true_mean, true_var = demo.population_statistics(model, "bn2", x_train)
    layer = model.get_layer("bn2")
    spread = np.sqrt(true_var).mean()
    assert np.abs(layer.moving_mean.numpy() - true_mean).max() < spread
    assert np.allclose(layer.moving_variance.numpy(), true_var, rtol=0.5)

    # The export: where it went, how to serve it, and that it serves the model.
    assert f"to {export_dir}" in out and "localhost:8501/v1/models/digits:predict" in out
    request = json.loads(re.search(r"curl -d '(.*?)'", out).group(1))
    example = np.asarray(request["instances"], "float32")
    assert example.shape == (1, 8, 8, 1)
    x_test = demo.load_digits_split()[1][0][:16]
    served = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    for x in (example, x_test):
        probabilities = served(image=tf.constant(x))["digit"].numpy()
        np.testing.assert_allclose(probabilities, model.predict(x, verbose=0), atol=1e-5)


def test_demo_skips_the_export_when_export_dir_is_empty(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo.main(["--epochs", "0", "--export-dir", ""])
    assert "exported" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
