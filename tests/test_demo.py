"""The `make demo` program trains to a useful accuracy and its statistics are sane."""

import numpy as np

from kerasbn import demo


def test_demo_trains_and_moving_statistics_approach_population(capsys):
    model, accuracy = demo.main(["--epochs", "8", "--export-dir", ""])
    assert accuracy > 0.85
    out = capsys.readouterr().out
    assert "test accuracy" in out and "true mean" in out
    x_train = demo.load_digits_split()[0][0]
    true_mean, true_var = demo.population_statistics(model, "bn2", x_train)
    layer = model.get_layer("bn2")
    spread = np.sqrt(true_var).mean()
    assert np.abs(layer.moving_mean.numpy() - true_mean).max() < spread
    assert np.allclose(layer.moving_variance.numpy(), true_var, rtol=0.5)
