"""Turning the `data` argument of `recalibrate` into repeatable passes of batches."""

import collections.abc

import numpy as np
import tensorflow as tf


def model_inputs(element):
    """The model input of a batch: `x` of `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    if isinstance(element, tuple) and 1 <= len(element) <= 3:
        return element[0]
    return element


class BatchSource:
    """Yields the same batches on every pass, at most `steps` of them.

    Accepts a `tf.data.Dataset` (already batched), NumPy arrays (or a dict or
    list of them, split into batches of `batch_size`), a `keras.utils.PyDataset`
    or other indexable sequence of batches, or an iterator/generator of batches.
    An iterator can only be consumed once: the batches drawn from it are kept in
    memory so that later passes see the same ones.
    """

    def __init__(self, data, steps=None, batch_size=32):
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"Argument `steps` must be None or a positive int. Received: steps={steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"Argument `batch_size` must be a positive int. Received: batch_size={batch_size!r}"
            )
        self.steps = steps
        self._kept = []
        if isinstance(data, tf.data.Dataset):
            if steps is None and data.cardinality() == tf.data.INFINITE_CARDINALITY:
                raise ValueError(
                    "Argument `data` is an infinite tf.data.Dataset: pass `steps` to bound each pass."
                )
            self._passes = lambda: iter(data)
            known = int(data.cardinality())
            self.length = known if known >= 0 else None
        elif _is_array_like(data):
            dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
            self._passes = lambda: iter(dataset)
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


def _is_array_like(data):
    if isinstance(data, np.ndarray) or tf.is_tensor(data):
        return True
    if isinstance(data, dict):
        return all(isinstance(v, np.ndarray) or tf.is_tensor(v) for v in data.values())
    return False
