"""`kerasbn.recalibrate`: replace moving averages by exact population statistics."""

import contextlib
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from kerasbn.kernels.axes import mask_to_broadcast
from kerasbn.layers.batch_norm import BatchNorm
from kerasbn.recalibration.batches import BatchSource
from kerasbn.recalibration.dependencies import levels
from kerasbn.recalibration.running_moments import RunningMoments


@dataclasses.dataclass
class LayerReport:
    """How far one layer's moving statistics were from the exact ones.

    Attributes:
      name: the layer's name.
      level: recalibration pass (0 = no normalization layer upstream).
      count: elements per feature the statistics were taken over.
      mean_error: max over features of |old mean − exact mean| / exact std.
      variance_error: max over features of |old variance / exact variance − 1|.
      old_mean, old_variance, mean, variance: per-feature arrays, before and after.
    """

    name: str
    level: int
    count: int
    mean_error: float
    variance_error: float
    old_mean: np.ndarray
    old_variance: np.ndarray
    mean: np.ndarray
    variance: np.ndarray

    def __str__(self):
        return (
            f"{self.name:<24} pass {self.level:>2}  {self.count:>10} values  "
            f"mean off by {self.mean_error:8.4f} std  variance off by {100 * self.variance_error:7.2f}%"
        )


def normalization_layers(model):
    """Every BatchNorm/BatchRenorm (ours) and Keras BatchNormalization in `model`."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, (BatchNorm, keras.layers.BatchNormalization))
    ]


def recalibrate(model, data, steps=None, *, batch_size=32, verbose=1):
    """Sets moving statistics to the exact population statistics over `data`.

    Every `kerasbn.BatchNorm`, `kerasbn.BatchRenorm` and
    `keras.layers.BatchNormalization` in `model` (nested models included) gets
    as `moving_mean` and `moving_variance` the exact mean and (biased) variance
    of its inputs over `data`, computed with every layer in inference mode
    ("precise BN"). Moving averages lag the weights they were collected under;
    this removes the lag, e.g. before export.

    Passes: a layer's inputs depend on the normalization layers upstream of it,
    so those are recalibrated first. The layers are grouped by how many
    normalization layers lie on their longest path from the input; each group
    takes one pass over `data`, all its layers at once. A model whose
    normalization layers do not feed each other needs one pass; a plain stack
    of conv-BN blocks needs one per block (a single pass cannot be exact there:
    each layer's inputs change when the layer above it is recalibrated).

    The passes run the model as its `predict` does: compiled with XLA when
    `model.jit_compile` is True (e.g. after `model.compile(jit_compile=True)`),
    as ordinary TensorFlow ops otherwise. A model that runs on this machine
    only through XLA (a channels-first `Conv2D` on a CPU without oneDNN)
    recalibrates once compiled with `jit_compile=True`.

    Args:
      model: a built Keras model. `ValueError` if unbuilt or without
        normalization layers.
      data: a batched `tf.data.Dataset`; arrays in memory as `fit` takes them
        (`x`, `(x, y)` or `(x, y, sample_weight)`, with `x` an array, a dict of
        arrays, or a list of one array per input of a multi-input model; split
        into batches of `batch_size`, `y` and the weights unused; `ValueError`
        if their lengths differ; a tuple is always read this way); a
        `keras.utils.PyDataset` or other sequence of batches (for a
        single-input model, a list of arrays is one); or an iterator of batches
        (kept in memory, so every pass sees the same ones). Batch elements may
        be `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)`. `TypeError` for
        anything else.
      steps: None (default, all of `data`) or the number of batches per pass;
        required for an infinite dataset. `ValueError` if not a positive int.
      batch_size: int, default 32, for NumPy arrays only.
      verbose: 0 for silence, 1 (default) for a progress bar per pass.

    Returns:
      A list of `LayerReport`, one per layer, in pass order.
    """
    if not model.built:
        raise ValueError("Argument `model` must be built (call it on data or build it) before recalibrating.")
    layers = normalization_layers(model)
    if not layers:
        raise ValueError(
            f"Argument `model` ({model.name!r}) has no BatchNorm, BatchRenorm or BatchNormalization layer."
        )
    source = BatchSource(data, steps, batch_size, input_count=_input_count(model))
    probe = _Probe(layers)
    with probe.installed():
        first = next(iter(source.batches()), None)
        if first is None:
            raise ValueError("Argument `data` yielded no batch.")
        layer_levels = probe.trace_levels(model, first)
        reached = [layer for layer in layers if layer in layer_levels]
        passes = max(layer_levels.values()) + 1
        reports = []
        for level in range(passes):
            active = [layer for layer in reached if layer_levels[layer] == level]
            probe.start(active)
            forward = tf.function(lambda x: model(x, training=False), jit_compile=_jit_compile(model))
            if verbose:
                print(f"Recalibration pass {level + 1}/{passes}: {len(active)} layer(s)")
            progress = keras.utils.Progbar(source.length, verbose=verbose)
            for index, x in enumerate(source.batches()):
                forward(x)
                progress.update(index + 1)
            reports.extend(_write_back(layer, probe.moments[layer], level) for layer in active)
    return reports


class _Probe:
    """Temporarily wraps the layers' `call` to record tensors and accumulate moments."""

    def __init__(self, layers):
        self.layers = layers
        self.recording = False
        self.inputs = {}
        self.outputs = {}
        self.moments = {}

    @contextlib.contextmanager
    def installed(self):
        originals = {}
        try:
            for layer in self.layers:
                originals[layer] = layer.__dict__.get("call")
                layer.call = self._wrap(layer, layer.call)
            yield self
        finally:
            for layer, original in originals.items():
                if original is None:
                    del layer.call
                else:
                    layer.call = original

    def _wrap(self, layer, call):
        def wrapped(inputs, *args, **kwargs):
            kwargs["training"] = False
            if layer in self.moments:
                self.moments[layer].update(inputs, _feature_axes(layer, inputs), _mask(layer, inputs, kwargs))
            outputs = call(inputs, *args, **kwargs)
            if self.recording:
                self.inputs.setdefault(layer, []).append(inputs)
                self.outputs.setdefault(layer, []).append(outputs)
            return outputs

        return wrapped

    def trace_levels(self, model, example):
        self.recording = True
        try:
            tf.function(lambda x: model(x, training=False)).get_concrete_function(
                tf.nest.map_structure(_relaxed_spec, example)
            )
        finally:
            self.recording = False
        reached = [layer for layer in self.layers if layer in self.inputs]
        return levels(reached, self.inputs, self.outputs)

    def start(self, active):
        self.moments = {layer: RunningMoments(layer.moving_mean.shape) for layer in active}


def _relaxed_spec(value):
    value = tf.convert_to_tensor(value)
    return tf.TensorSpec([None] + list(value.shape[1:]), value.dtype)


def _feature_axes(layer, inputs):
    if isinstance(layer, BatchNorm):
        return layer.feature_axes
    return (layer.axis % len(inputs.shape),)


def _mask(layer, inputs, kwargs):
    mask = kwargs.get("mask")
    if mask is None:
        return None
    return mask_to_broadcast(mask, len(inputs.shape), _feature_axes(layer, inputs))


def _write_back(layer, moments, level):
    old_mean = layer.moving_mean.numpy().astype(np.float64)
    old_variance = layer.moving_variance.numpy().astype(np.float64)
    count = moments.count.numpy()
    seen = count > 0
    mean = np.where(seen, moments.mean.numpy(), old_mean)
    variance = np.where(seen, moments.variance().numpy(), old_variance)
    layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    stddev = np.sqrt(variance + layer.epsilon)
    for name, value in (("moving_stddev", stddev), ("renorm_mean", mean), ("renorm_stddev", stddev)):
        variable = getattr(layer, name, None)
        if variable is not None:
            variable.assign(value.astype(variable.dtype))
    exact_std = np.sqrt(variance + layer.epsilon)
    return LayerReport(
        name=layer.name,
        level=level,
        count=int(count.min()),
        mean_error=float(np.max(np.abs(old_mean - mean) / exact_std)),
        variance_error=float(np.max(np.abs(old_variance / np.maximum(variance, 1e-12) - 1.0))),
        old_mean=old_mean,
        old_variance=old_variance,
        mean=mean,
        variance=variance,
    )


def _jit_compile(model):
    """True when Keras would run `model.predict` through XLA (`model.jit_compile`)."""
    return getattr(model, "jit_compile", False) is True


def _input_count(model):
    """How many inputs `model` takes (1 when it does not say, as a subclassed model)."""
    try:
        return max(len(model.inputs), 1)
    except (AttributeError, ValueError, TypeError):
        return 1
