"""Channels-first models with our layers run wherever Keras' own layers run them.

TensorFlow's CPU convolution takes channels-first inputs only with oneDNN; XLA
runs them on any CPU. So on every CPU: a channels-first convolution compiled
with `jit_compile=True`, and a channels-first normalization around a
channels-last convolution without XLA, must train, predict, recalibrate and
export with our layers (axis=1) as they do with Keras' layers.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn

OURS = {
    "BatchNorm": lambda: kerasbn.BatchNorm(axis=1, name="norm"),
    "BatchRenorm": lambda: kerasbn.BatchRenorm(axis=1, name="norm"),
    "GroupNorm": lambda: kerasbn.GroupNorm(groups=2, axis=1, name="norm"),
}
KERAS = {
    "BatchNorm": lambda: keras.layers.BatchNormalization(axis=1, name="norm"),
    "BatchRenorm": lambda: keras.layers.BatchNormalization(axis=1, name="norm"),
    "GroupNorm": lambda: keras.layers.GroupNormalization(groups=2, axis=1, name="norm"),
}


def conv_model(norm, channels_first_conv):
    """(N, 3, 8, 8) -> conv -> norm(axis=1) -> ReLU -> pooling -> Dense(2)."""
    inputs = keras.Input((3, 8, 8), name="image")
    if channels_first_conv:
        h = keras.layers.Conv2D(4, 3, data_format="channels_first", name="conv")(inputs)
    else:  # a channels-last convolution between two transposes
        h = keras.layers.Permute((2, 3, 1))(inputs)
        h = keras.layers.Conv2D(4, 3, name="conv")(h)
        h = keras.layers.Permute((3, 1, 2))(h)
    h = keras.layers.ReLU()(norm(h))
    h = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="scores")(h))


def train_and_predict(model, x, y, jit_compile):
    model.compile("sgd", "mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    return model.predict(x, verbose=0)


@pytest.mark.parametrize("channels_first_conv", [True, False], ids=["cf_conv_xla", "cl_conv_plain"])
@pytest.mark.parametrize("name", sorted(OURS))
def test_ours_run_where_keras_runs(rng, tmp_path, name, channels_first_conv):
    # XLA where the convolution is channels-first (as any CPU needs), plain ops otherwise.
    jit_compile = channels_first_conv
    x = rng.normal(1.0, 2.0, (24, 3, 8, 8)).astype("float32")
    y = rng.normal(size=(24, 2)).astype("float32")
    train_and_predict(conv_model(KERAS[name](), channels_first_conv), x, y, jit_compile)

    model = conv_model(OURS[name](), channels_first_conv)
    predicted = train_and_predict(model, x, y, jit_compile)
    assert np.all(np.isfinite(predicted))
    if name != "GroupNorm":  # no moving statistics to recalibrate
        (report,) = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
        assert report.count == 24 * 6 * 6
        predicted = model.predict(x, verbose=0)

    path = kerasbn.export_for_serving(model, tmp_path / "1", jit_compile=jit_compile)
    # jit_compile=True marks the served function for XLA, which then runs it.
    loaded = tf.saved_model.load(path)
    served = loaded.signatures["serving_default"](image=tf.constant(x))["scores"].numpy()
    np.testing.assert_allclose(served, predicted, rtol=1e-4, atol=1e-4)
