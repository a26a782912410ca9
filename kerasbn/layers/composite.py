"""Which inputs the layers accept, and how a ragged input is normalized.

Keras' `BatchNormalization` normalizes a `tf.RaggedTensor` with statistics
over its flat values (every element, whatever row it belongs to) and returns a
ragged tensor with the input's row partitions; `GroupNormalization` rejects
ragged inputs. The kernels take dense tensors, so a ragged input runs through
the layer's dense `call` on its flat values, with `ragged_rank` axes of size 1
in front: the feature axes keep their index, every other axis is still
reduced, and the output goes back into the input's row partitions.

Ghost batches (`virtual_batch_size`) are cut along the batch axis, which the
flat values do not have: there the input is padded to a dense tensor, the
padding is masked out, and the valid positions are gathered back.

Sparse tensors, strings and complex numbers are refused with a `TypeError`
before the layer is built. Integer and boolean inputs are cast to float, as
Keras' layers do.
"""

import numpy as np
import tensorflow as tf
from keras import KerasTensor


class CompositeInputs:
    """Mixin of the layers: checks `inputs` before Keras builds and calls the layer.

    `accepts_ragged` says whether the layer normalizes ragged inputs.
    """

    accepts_ragged = True

    def __call__(self, inputs, *args, **kwargs):
        check_inputs(self, inputs)
        return super().__call__(inputs, *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        # Keras' spec from `compute_output_shape` is dense; the output of a
        # ragged input is ragged with the same partitions.
        spec = super().compute_output_spec(inputs, *args, **kwargs)
        if getattr(inputs, "ragged", False):
            # Keras before 3.11 has no `ragged_rank` on symbolic tensors.
            rank = {"ragged_rank": inputs.ragged_rank} if hasattr(inputs, "ragged_rank") else {}
            return KerasTensor(spec.shape, dtype=spec.dtype, ragged=True, **rank)
        return spec


def check_inputs(layer, inputs):
    """Refuses inputs the layer cannot normalize, naming the layer and the argument.

    Args:
      layer: the calling layer; its `axis` and `accepts_ragged` are read.
      inputs: what was passed as `inputs`: a tensor, a `tf.RaggedTensor`, a
        `tf.SparseTensor`, a `keras.KerasTensor` or a NumPy array. Anything
        else is left to Keras.

    Raises:
      TypeError: for a sparse tensor; a string, complex or other non-numeric
        dtype; a ragged tensor given to a layer without `accepts_ragged`; or
        a ragged tensor whose feature axis is one of its ragged (row
        partition) axes.
    """
    name = type(layer).__name__
    if isinstance(inputs, tf.SparseTensor) or getattr(inputs, "sparse", False):
        raise TypeError(
            f"{name} does not accept sparse inputs: batch statistics would count "
            f"the implicit zeros. Pass `tf.sparse.to_dense(inputs)`. Received: "
            f"inputs of type {type(inputs).__name__}"
        )
    dtype = _dtype_name(inputs)
    if dtype is not None and not _is_real_number(dtype):
        raise TypeError(
            f"{name} needs real-valued inputs (float, or int and bool, which are "
            "cast to float as Keras' layers do); strings have no statistics, and "
            "complex numbers would lose their imaginary part. Received: inputs "
            f"with dtype={dtype}"
        )
    ragged = isinstance(inputs, tf.RaggedTensor) or getattr(inputs, "ragged", False)
    if not ragged:
        return
    if not layer.accepts_ragged:
        raise TypeError(
            f"{name} does not accept ragged inputs, as Keras' layer does not: its "
            "per-sample groups are undefined over rows of different lengths. Pass "
            "`inputs.to_tensor()` and a mask of the padding. Received: inputs of "
            f"type {type(inputs).__name__}"
        )
    shape = tuple(inputs.shape)
    if getattr(inputs, "ragged_rank", None) is None:
        # A ragged `keras.Input` leaves ragged_rank unset (or, before Keras
        # 3.11, has none): its ragged axes are
        # the unknown ones after the batch axis.
        partitions = [a for a in range(1, len(shape)) if shape[a] is None]
    else:
        partitions = list(range(1, inputs.ragged_rank + 1))
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    # An out-of-range axis is left to the layer's own check at build time.
    if any(-len(shape) <= a < len(shape) and a % len(shape) in partitions for a in axes):
        raise TypeError(
            f"{name} cannot take a feature axis along a ragged dimension (axes "
            f"{partitions} of this input): its rows have different lengths, so it "
            "has no fixed number of features. Received: "
            f"axis={layer.axis} for ragged inputs of shape {shape}"
        )


def call_ragged(layer, inputs, mask, **call_kwargs):
    """`layer.call` on a `tf.RaggedTensor`, returning one with the same partitions.

    Args:
      layer: a built layer with `feature_axes` (indices in the ragged input's
        shape, all past its ragged axes); its dense `call` does the work.
      inputs: a `tf.RaggedTensor`.
      mask: None, or a boolean `tf.RaggedTensor` with the same row partitions
        as `inputs` and the input's shape without the feature axes.
      **call_kwargs: passed on to `layer.call` (`training`).

    Raises:
      TypeError: naming `mask`, if it is not a `tf.RaggedTensor`.
      ValueError: naming `mask`, if its partitions differ from the input's
        (an `InvalidArgumentError` when that is only known while running a
        graph).
    """
    checks = [] if mask is None else _check_ragged_mask(layer, mask, inputs)
    with tf.control_dependencies(checks):
        if getattr(layer, "virtual_batch_size", None) is not None:
            y = _call_padded(layer, inputs, mask, call_kwargs)
        else:
            y = _call_flat(layer, inputs, mask, call_kwargs)
    return inputs.with_flat_values(y)


def _call_flat(layer, inputs, mask, call_kwargs):
    """Output flat values of `layer.call` on the input's flat values.

    Leading axes of size 1 stand for the ragged axes, so the feature axes keep
    their index and the flat axis is reduced like a batch axis.
    """
    lead = (0,) * inputs.ragged_rank

    def expand(values):
        return tf.reshape(values, tf.concat([[1] * len(lead), tf.shape(values)], 0))

    x = expand(inputs.flat_values)
    m = None if mask is None else expand(mask.flat_values)
    return layer.call(x, mask=m, **call_kwargs)[lead]


def _call_padded(layer, inputs, mask, call_kwargs):
    """Output flat values of `layer.call` on the zero-padded input, padding masked out.

    Ghost batches need the batch axis, which the flat values do not have.
    """
    values = inputs.flat_values
    if mask is None:
        flat_axes = [axis - inputs.ragged_rank for axis in layer.feature_axes]
        mask = inputs.with_flat_values(tf.ones(_shape_without(values, flat_axes), tf.bool))
    rows = inputs.with_flat_values(tf.ones(tf.shape(values)[:1], tf.bool))
    y = layer.call(inputs.to_tensor(), mask=mask.to_tensor(False), **call_kwargs)
    return tf.gather_nd(y, tf.where(rows.to_tensor(False)))


def _check_ragged_mask(layer, mask, inputs):
    """Assertions that `mask` has the row partitions of `inputs` (empty if checked now)."""
    name = type(layer).__name__
    if not isinstance(mask, tf.RaggedTensor) or mask.ragged_rank != inputs.ragged_rank:
        raise TypeError(
            f"{name} needs a ragged `mask` with the row partitions of its ragged "
            f"inputs (ragged_rank {inputs.ragged_rank}). Received: mask of type "
            f"{type(mask).__name__}"
            + (f" with ragged_rank {mask.ragged_rank}" if isinstance(mask, tf.RaggedTensor) else "")
        )
    message = (
        f"{name}: argument `mask` must have the same row lengths as `inputs` "
        "(the input's shape without the feature axes)."
    )
    checks = []
    for got, want in zip(mask.nested_row_splits, inputs.nested_row_splits):
        got = tf.cast(got, want.dtype)
        if tf.executing_eagerly():
            if got.shape != want.shape or not bool(tf.reduce_all(got == want)):
                raise ValueError(
                    f"{message} Received: mask row splits {got.numpy().tolist()}, "
                    f"inputs row splits {want.numpy().tolist()}"
                )
        else:
            checks.append(tf.debugging.assert_equal(tf.shape(got), tf.shape(want), message=message))
            with tf.control_dependencies(checks[-1:]):
                checks.append(tf.debugging.assert_equal(got, want, message=message))
    return checks


def _shape_without(values, axes):
    """The dynamic shape of `values` without the given axes."""
    shape = tf.shape(values)
    return tf.stack([shape[i] for i in range(values.shape.rank) if i not in axes])


def _dtype_name(inputs):
    """The dtype name of a tensor, ragged, KerasTensor or array, or None."""
    dtype = getattr(inputs, "dtype", None)
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return dtype
    if isinstance(dtype, tf.DType):
        return dtype.name
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return str(dtype)
    # NumPy text arrays become string tensors; object arrays are left to Keras.
    if dtype.kind in "US":
        return "string"
    return None if dtype.kind == "O" else dtype.name


def _is_real_number(dtype):
    """Whether Keras' layers cast `dtype` to float: floats, ints, unsigned ints, bool."""
    try:
        tf_dtype = tf.as_dtype(dtype)
    except TypeError:
        return False
    return tf_dtype.is_bool or tf_dtype.is_integer or tf_dtype.is_floating
