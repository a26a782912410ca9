"""`kerasbn.export_for_serving`: a SavedModel that stock TF Serving can load."""

import os

import keras
import tensorflow as tf

from kerasbn.export import signature
from kerasbn.export.directory import atomic_directory, check_export_dir
from kerasbn.export.inference_model import fold_batchnorm as folded_copy
from kerasbn.export.inspection import xla_compiled_nodes
from kerasbn.kernels import jit_disabled

SERVING_KEY = "serving_default"


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; received {name}={value!r}.")
    return value


def check_model(model):
    """`TypeError` unless a Keras model; `ValueError` if unbuilt or without inputs."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a keras.Model; received model={model!r} of type "
            f"{type(model).__name__}."
        )
    if not model.built:
        raise ValueError(
            f"model {model.name!r} is not built: call it on data, build it with "
            "model.build(input_shape), or give it a keras.Input, before exporting."
        )
    signature.model_inputs(model)
    return model


class _ServingModule(tf.Module):
    """What is saved: the variables the serving function reads, and the function."""

    def __init__(self, concrete_function):
        super().__init__(name="kerasbn_serving")
        # Track exactly the variables the function captures: no optimizer or
        # metric state, and no moving statistics of a folded batch norm.
        self.serving_variables = list(concrete_function.variables)
        self.serve = concrete_function


def serving_function(model, inference_model, jit_compile):
    """The concrete `serving_default` function of `inference_model`.

    Traced with the layers' non-XLA kernels unless `jit_compile`, in which case
    the whole function is compiled with XLA (`_XlaMustCompile`).
    """
    specs = signature.input_specs(model)

    def serve(*tensors):
        inputs = signature.pack_inputs(model, tensors)
        outputs = inference_model(inputs, training=False)
        return signature.named_outputs(model, outputs)

    function = tf.function(serve, jit_compile=True if jit_compile else None, autograph=False)
    if jit_compile:
        return function.get_concrete_function(*specs)
    with jit_disabled():
        concrete = function.get_concrete_function(*specs)
    check_no_xla(concrete)
    return concrete


def check_no_xla(concrete_function):
    """`ValueError` if a function in the traced graph must be compiled by XLA.

    Our layers trace their plain kernels here, but some Keras layers compile
    themselves with XLA whatever we do: on CPU, Keras' TensorFlow backend runs
    grouped convolutions (`groups > 1`) and channels-first `Conv3D` through
    `tf.function(jit_compile=True)`.
    """
    marked = xla_compiled_nodes(concrete_function.graph.as_graph_def())
    if marked:
        raise ValueError(
            "The model contains operations that Keras itself compiles with XLA "
            "(e.g. a grouped convolution, groups > 1, or a channels-first Conv3D), "
            f"marked _XlaMustCompile in the served graph: {sorted(set(marked))[:5]}. "
            "Stock TF Serving cannot run them. Pass jit_compile=True to export for "
            "a server built with XLA support anyway."
        )


def export_for_serving(
    model, export_dir, *, fold_batchnorm=True, jit_compile=False, overwrite=False
):
    """Writes an inference-only SavedModel of `model` for TF Serving.

    The SavedModel has one signature, `serving_default`, whose inputs are named
    after the model's inputs (the `name` of each `keras.Input`) and whose
    outputs are named after the layers producing the model's outputs (or the
    keys of a dict of outputs); every batch dimension is unknown. The graph is
    traced with `training=False` and uses only standard TensorFlow ops: no
    `PyFunc`, nothing from kerasbn, and no function marked `_XlaMustCompile`
    unless `jit_compile=True`. Loading it needs neither Python nor kerasbn: TF
    Serving, `tf.saved_model.load`, the TF1 session loader, `saved_model_cli`
    and `tf.lite.TFLiteConverter.from_saved_model` all work.

    TF Serving watches a base directory and serves its numbered version
    subdirectories, so pass `export_dir="base/<version>"`, e.g.
    `"saved_models/digits/1"`, and serve `base` under a model name.

    Folding (`fold_batchnorm=True`): every `kerasbn.BatchNorm` (and subclass,
    e.g. `kerasbn.BatchRenorm`) and `keras.layers.BatchNormalization` that
    directly follows a `Conv1D`/`Conv2D`/`Conv3D`, `DepthwiseConv1D`/
    `DepthwiseConv2D` or `Dense` layer (its only consumer; the producer has a
    linear activation; the batch norm normalizes the producer's channel axis)
    is folded into that layer's kernel and bias: the served graph does no
    normalization work for it, and with a float32 policy computes the same
    outputs to float32 rounding. Under a mixed-precision policy the folded
    layer computes in the compute dtype, as the producer did: the export and
    the model are then both off the exact result by that dtype's rounding, and
    differ by at most `2u · |γ|/sqrt(σ² + ε) · (|x| ⊛ |K| + |c|)`
    (u = 2**-11 for float16, 2**-8 for bfloat16; up to about 6e-3 and 3e-2
    for activations of unit scale, more when the inputs' mean is large against
    their spread). Other batch norms are exported as they are. Folding works on a
    copy of the model (see `kerasbn.export.inference_model`); `model` is not
    modified.

    The SavedModel is written to a temporary directory next to `export_dir`
    and renamed into place when complete, so nothing half-written is left
    behind on failure, and TF Serving never picks up a partial version.

    Args:
      model: a built Functional or Sequential `keras.Model` with known inputs.
        `TypeError` if not a `keras.Model`; `ValueError` if not built or
        without inputs (a subclassed model: use `model.export(...)` with an
        `input_signature`).
      export_dir: str or `os.PathLike`, the SavedModel directory to create
        (parents are created). `TypeError` if not a path; `ExportDirExistsError`
        (a `FileExistsError` and a `ValueError`) if it is a file, or a
        non-empty directory and `overwrite` is False; `PermissionError` if it
        cannot be written.
      fold_batchnorm: bool, default True. Fold batch norms into the preceding
        convolution or dense layer, as described above. `TypeError` if not a
        bool.
      jit_compile: bool, default False. Compile the whole serving function with
        XLA (`tf.function(jit_compile=True)`). Only for servers built with XLA
        JIT support: stock TF Serving cannot run such functions. With False,
        our layers trace their plain (non-XLA) kernels. `TypeError` if not a
        bool.
      overwrite: bool, default False. Replace an existing non-empty
        `export_dir`. The old directory is removed only once the new one is in
        place. `TypeError` if not a bool.

    Raises:
      ValueError: besides the argument errors above, with `jit_compile=False`,
        if Keras itself compiles part of the model with XLA (on CPU, a grouped
        `Conv` with `groups > 1` or a channels-first `Conv3D`); nothing is
        written.

    Returns:
      The absolute path of the SavedModel directory, as a str.

    Example:

    ```python
    path = kerasbn.export_for_serving(model, "saved_models/digits/1")
    served = tf.saved_model.load(path).signatures["serving_default"]
    probabilities = served(image=tf.constant(images))["digit"]
    ```
    """
    check_model(model)
    path = check_export_dir(export_dir)
    _check_bool(fold_batchnorm, "fold_batchnorm")
    _check_bool(jit_compile, "jit_compile")
    _check_bool(overwrite, "overwrite")

    inference_model = folded_copy(model)[0] if fold_batchnorm else model
    concrete = serving_function(model, inference_model, jit_compile)
    module = _ServingModule(concrete)
    with atomic_directory(path, overwrite=overwrite) as staging:
        tf.saved_model.save(module, staging, signatures={SERVING_KEY: concrete})
    return os.fspath(path)

