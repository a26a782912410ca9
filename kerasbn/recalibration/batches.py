"""Turning the `data` argument of `recalibrate` into repeatable passes of batches."""

import collections.abc
import numbers

import numpy as np
import tensorflow as tf


def model_inputs(element):
    """The model input of a batch: `x` of `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    if isinstance(element, tuple) and 1 <= len(element) <= 3:
        return element[0]
    return element


class BatchSource:
    """Yields the same batches on every pass, at most `steps` of them.

    Accepts a `tf.data.Dataset` (already batched); data in memory as Keras'
    `fit` takes it, split into batches of `batch_size`: `x`, or a tuple
    `(x,)`, `(x, y)` or `(x, y, sample_weight)`, where `x` is an array or tensor,
    a dict of them, or, for a model with `input_count` > 1 inputs, a list of
    exactly that many; a `keras.utils.PyDataset` or other indexable sequence of
    batches (a list of arrays for a single-input model); or an
    iterator/generator of batches. An iterator can only be consumed once: the
    batches drawn from it are kept in memory so that later passes see the same
    ones.
    """

    def __init__(self, data, steps=None, batch_size=32, input_count=1):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"Argument `steps` must be None or a positive int. Received: steps={steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"Argument `batch_size` must be a positive int. Received: batch_size={batch_size!r}"
            )
        self.steps = steps
        self._kept = []
        inputs = _in_memory_inputs(data, input_count)
        if isinstance(data, tf.data.Dataset):
            if steps is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
                raise ValueError(
                    "Argument `data` is an infinite tf.data.Dataset: pass `steps` to bound each pass."
                )
            self._passes = lambda: iter(data)
            known = int(data.cardinality())
            self.length = known if known >= 0 else None
        elif inputs is not None:
            _check_same_length(data)
            # A list stays a list of inputs (from_tensor_slices would stack it).
            slices = tuple(inputs) if isinstance(inputs, list) else inputs
            dataset = tf.data.Dataset.from_tensor_slices(slices).batch(batch_size)
            as_list = isinstance(inputs, list)
            self._passes = lambda: (list(batch) if as_list else batch for batch in dataset)
            self.length = int(dataset.cardinality())
        elif isinstance(data, collections.abc.Sequence) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")
        ):
            self._passes = lambda: (data[i] for i in range(len(data)))
            self.length = len(data)
        elif isinstance(data, collections.abc.Iterable):
            iterator = iter(data)
            self._passes = None
            self._iterator = iterator
            self.length = None
        else:
            raise TypeError(
                "Argument `data` must be a tf.data.Dataset, NumPy arrays, a sequence of "
                f"batches or an iterator of batches. Received: data of type {type(data).__name__}"
            )
        if self.length is not None and steps is not None:
            self.length = min(self.length, steps)
        elif steps is not None:
            self.length = steps

    def batches(self):
        """One pass: an iterator over model inputs, the same on every pass."""
        if self._passes is not None:
            for index, element in enumerate(self._passes()):
                if self.steps is not None and index >= self.steps:
                    return
                yield model_inputs(element)
            return
        # A one-shot iterator: replay what was drawn before, then draw more.
        index = 0
        while self.steps is None or index < self.steps:
            if index == len(self._kept):
                element = next(self._iterator, _END)
                if element is _END:
                    return
                self._kept.append(model_inputs(element))
            yield self._kept[index]
            index += 1


_END = object()


def _is_array(value):
    return isinstance(value, np.ndarray) or tf.is_tensor(value)


def _is_inputs(value, input_count):
    """The `x` of Keras' `fit` for a model with `input_count` inputs.

    An array, a non-empty dict of arrays, or a list of exactly `input_count`
    arrays when the model has several inputs (for one input, a list of arrays
    is a sequence of batches).
    """
    if _is_array(value):
        return True
    if isinstance(value, dict) and value:
        return all(_is_array(part) for part in value.values())
    if isinstance(value, list) and input_count > 1 and len(value) == input_count:
        return all(_is_array(part) for part in value)
    return False


def _is_target(value):
    """A `y` or `sample_weight` in memory: None, arrays, or a list of numbers."""
    if value is None or _is_array(value):
        return True
    if isinstance(value, (dict, list)) and value:
        parts = value.values() if isinstance(value, dict) else value
        if all(_is_array(part) for part in parts):
            return True
        return isinstance(value, list) and all(isinstance(part, numbers.Number) for part in value)
    return False


def _in_memory_inputs(data, input_count):
    """`x` when `data` is `x`, `(x,)`, `(x, y)` or `(x, y, sample_weight)` in memory, else None."""
    if _is_inputs(data, input_count):
        return data
    if (
        isinstance(data, tuple)
        and 1 <= len(data) <= 3
        and _is_inputs(data[0], input_count)
        and all(_is_target(part) for part in data[1:])
    ):
        return data[0]
    return None


def _length(part):
    return len(part) if isinstance(part, list) else int(part.shape[0])


def _check_same_length(data):
    parts = list(data) if isinstance(data, tuple) else [data]
    arrays = []
    for part in parts:
        if part is None:
            continue
        if isinstance(part, list) and not all(_is_array(item) for item in part):
            arrays.append(part)  # a list of numbers
        else:
            arrays.extend(tf.nest.flatten(part))
    lengths = {_length(array) for array in arrays}
    if len(lengths) > 1:
        raise ValueError(
            "Argument `data` holds arrays of different lengths (first dimensions "
            f"{sorted(lengths)}): in memory, `x`, `y` and `sample_weight` (and every input "
            "of a multi-input model) need one row per example. Pass batches as a "
            "tf.data.Dataset or a generator instead."
        )
