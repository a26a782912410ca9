"""Which batch normalization layers of a Keras model can be folded, and into what.

A normalization layer `bn` is folded into the layer `producer` before it when, in
a Functional or Sequential model (nested ones included):

- `bn` is a `kerasbn.BatchNorm` (or a subclass, such as `kerasbn.BatchRenorm`)
  or a `keras.layers.BatchNormalization`, called once, not with an explicit
  `training=True`, on a single tensor;
- that tensor is the only output of `producer`, a `Conv1D`, `Conv2D`, `Conv3D`,
  `DepthwiseConv1D`, `DepthwiseConv2D` or `Dense` called once, with a linear
  activation, neither quantized nor with LoRA enabled;
- `bn` is that tensor's only consumer and it is not itself a model output;
- `bn` normalizes exactly the producer's channel axis (the last axis, or axis 1
  for a channels-first convolution).

Anything else (a ReLU between the two, a shared layer, a subclassed model's
internals, a batch norm over another axis) is left as it is, so the exported
model still computes the same function; it just keeps that normalization.

The attributes of the normalization layer are read duck-typed: `moving_mean`,
`moving_variance`, `epsilon`, `gamma`/`beta` (or None), and `feature_axes`
(ours, once built) or `axis` (Keras').
"""

import dataclasses

import keras

from kerasbn.export import folding
from kerasbn.layers.batch_norm import BatchNorm

# DepthwiseConv1D/2D are not subclasses of Conv1D/2D: their kernels are
# (*spatial, in, multiplier), folded with the DEPTHWISE layout.
_DEPTHWISE_TYPES = tuple(
    getattr(keras.layers, name)
    for name in ("DepthwiseConv1D", "DepthwiseConv2D")
    if hasattr(keras.layers, name)
)
_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_DENSE_TYPES = (keras.layers.Dense,)
_NORMALIZATION_TYPES = (BatchNorm, keras.layers.BatchNormalization)


@dataclasses.dataclass(frozen=True)
class FoldPair:
    """A producer layer and the batch normalization folded into it."""

    producer: keras.layers.Layer
    normalization: keras.layers.Layer
    layout: str  # folding.OUTPUT_LAST or folding.DEPTHWISE


def is_normalization(layer):
    """Whether `layer` is a batch norm this module knows how to fold."""
    return isinstance(layer, _NORMALIZATION_TYPES)


def producer_layout(layer):
    """The kernel layout of a foldable producer, or None if it is not one."""
    if isinstance(layer, _DEPTHWISE_TYPES):
        return folding.DEPTHWISE
    if isinstance(layer, _CONV_TYPES + _DENSE_TYPES):
        return folding.OUTPUT_LAST
    return None


def has_linear_activation(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def is_plain_producer(layer):
    """Linear activation, not quantized, no LoRA: `x ⊛ kernel + bias` exactly."""
    return (
        producer_layout(layer) is not None
        and layer.built
        and has_linear_activation(layer)
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "lora_enabled", False)
    )


def channel_axis(layer, rank):
    """The output channel axis of a producer whose output has rank `rank`."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


def normalized_axes(layer, rank):
    """The feature axes of a normalization layer, non-negative, sorted."""
    axes = getattr(layer, "feature_axes", None)
    if axes is None:
        axes = getattr(layer, "axis", None)
    if axes is None:
        return None
    if isinstance(axes, int):
        axes = [axes]
    return tuple(sorted(axis % rank for axis in axes))


def _single_node(layer):
    nodes = getattr(layer, "_inbound_nodes", [])
    return nodes[0] if len(nodes) == 1 else None


def _explicit_training(node):
    arguments = getattr(node, "arguments", None)
    kwargs = getattr(arguments, "kwargs", None) or {}
    return bool(kwargs.get("training", False))


def fold_pair_for(normalization, model_outputs):
    """The `FoldPair` folding `normalization`, or None if it cannot be folded.

    Args:
      normalization: a layer for which `is_normalization` holds.
      model_outputs: ids of KerasTensors that are outputs of some model being
        exported (a producer output among them must stay observable).
    """
    node = _single_node(normalization)
    if node is None or _explicit_training(node) or not normalization.built:
        return None
    if len(node.input_tensors) != 1:
        return None
    tensor = node.input_tensors[0]
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None
    producer = history[0]
    if not is_plain_producer(producer) or _single_node(producer) is None:
        return None
    if len(_single_node(producer).output_tensors) != 1:
        return None
    if len(getattr(producer, "_outbound_nodes", [])) != 1 or id(tensor) in model_outputs:
        return None
    rank = len(tensor.shape)
    if normalized_axes(normalization, rank) != (channel_axis(producer, rank),):
        return None
    return FoldPair(producer, normalization, producer_layout(producer))


def graph_models(model):
    """`model` and every Functional or Sequential model nested in it."""
    found = [model]
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.Model) and _is_graph_model(layer):
            found.append(layer)
    return found


def _is_graph_model(model):
    return isinstance(model, keras.Sequential) or hasattr(model, "_run_through_graph")


def _output_ids(models):
    ids = set()
    for model in models:
        for tensor in getattr(model, "outputs", None) or []:
            ids.add(id(tensor))
    return ids


def find_fold_pairs(model):
    """Every `FoldPair` of `model`, nested Functional/Sequential models included.

    Returns an empty list for a model that is neither Functional nor Sequential
    (its layer graph is not known).
    """
    if not _is_graph_model(model):
        return []
    models = graph_models(model)
    outputs = _output_ids(models)
    pairs = []
    seen = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) in seen or not is_normalization(layer):
            continue
        seen.add(id(layer))
        pair = fold_pair_for(layer, outputs)
        if pair is not None:
            pairs.append(pair)
    return pairs
