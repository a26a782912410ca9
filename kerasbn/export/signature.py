"""Names and specs of a serving signature, taken from a Keras model.

The `serving_default` signature of an export takes one tensor per model input,
named after the input (the name given to `keras.Input`), and returns a dict of
tensors named after the layers that produce the model's outputs (the keys of
the output dict, for a model built with a dict of outputs). The batch
dimension is always unknown.
"""

import re

import keras
import tensorflow as tf

_INVALID = re.compile(r"[^A-Za-z0-9_.\-]")


def model_inputs(model):
    """The model's input KerasTensors; `ValueError` if it has none."""
    inputs = None
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        pass
    if not inputs:
        raise ValueError(
            f"model {model.name!r} has no inputs: export_for_serving needs a "
            "Functional or Sequential model that knows its input shapes (built with "
            "keras.Input(...) or model.build(shape)). For a subclassed model, use "
            "model.export(export_dir, input_signature=...)."
        )
    return list(inputs)


def tensor_name(tensor, default):
    """The name of the layer that produced a KerasTensor, or `default`."""
    history = getattr(tensor, "_keras_history", None)
    name = getattr(history[0], "name", None) if history else None
    return name or getattr(tensor, "name", None) or default


def sanitize(names, prefix):
    """Valid, unique TensorFlow names: invalid characters become `_`."""
    result = []
    for index, name in enumerate(names):
        clean = _INVALID.sub("_", str(name)) or f"{prefix}_{index}"
        if not clean[0].isalnum() and clean[0] != ".":
            clean = f"{prefix}{clean}"
        candidate, suffix = clean, 1
        while candidate in result:
            candidate = f"{clean}_{suffix}"
            suffix += 1
        result.append(candidate)
    return result


def input_names(model):
    """One signature argument name per model input."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        names = list(keras.tree.flatten(_keys_as_values(struct)))
    else:
        names = [tensor_name(t, f"input_{i}") for i, t in enumerate(model_inputs(model))]
    return sanitize(names, "input")


def _keys_as_values(struct):
    return {key: key for key in struct}


def input_specs(model):
    """`tf.TensorSpec`s of the inputs, batch dimension None, named."""
    names = input_names(model)
    return [
        tf.TensorSpec((None,) + tuple(tensor.shape[1:]), tf.as_dtype(tensor.dtype), name=name)
        for tensor, name in zip(model_inputs(model), names)
    ]


def pack_inputs(model, tensors):
    """The flat input tensors in the structure `model(...)` expects."""
    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, list(tensors))
    return tensors[0] if len(tensors) == 1 else list(tensors)


def output_names(model):
    """One name per flat model output."""
    names = getattr(model, "output_names", None)
    if not names:
        names = [tensor_name(t, f"output_{i}") for i, t in enumerate(model.outputs)]
    return sanitize(names, "output")


def named_outputs(model, outputs):
    """The model's outputs as the signature's `{name: tensor}`."""
    if isinstance(outputs, dict):
        keys = sanitize(list(outputs), "output")
        return dict(zip(keys, outputs.values()))
    flat = keras.tree.flatten(outputs)
    names = output_names(model)
    if len(names) != len(flat):
        names = sanitize([f"output_{i}" for i in range(len(flat))], "output")
    return dict(zip(names, flat))
