"""When a training kernel is worth compiling with XLA: shapes that recur.

XLA compiles a program once per concrete input shape, which costs far more than
one call saves (about a second for a batch norm's forward and backward
programs, against a few milliseconds gained per call). So a training kernel
called outside an XLA-compiled function starts on its plain TensorFlow graph
for every new input shape, and switches to its XLA programs once that shape has
been used `warmup_calls` times: the steady batch of a training run is compiled
early on, while the last, partial batch of an epoch, or a sequence length seen
a few times, never waits for a compiler. At most `max_shapes` shapes are
compiled per kernel and configuration; further shapes stay plain, with a
one-time warning (training on many distinct shapes, e.g. unpadded sequences,
would otherwise compile without end).

Each layer counts its own calls (`ShapeUse`), in a `MutableHashTable` updated
by the training graph itself, so the decision is taken at run time, per call,
for the shape actually seen (a `tf.function` traced once with an unknown batch
size sees all of them). Layers whose inputs have the same shape share the
compiled programs: XLA caches them by shape.
"""

import contextlib
import itertools
import threading
import warnings

import tensorflow as tf

DEFAULT_WARMUP_CALLS = 50
DEFAULT_MAX_SHAPES = 16
# Below this many input elements a training call is never compiled: running an
# XLA program has a fixed cost (about 0.3 ms for a normalization's forward and
# backward on a 2-core AVX2 CPU) that a small input does not win back. Measured
# there (oneDNN off), one training step of a layer, XLA programs against plain
# ops inline in the caller's graph, in ms: BatchNorm (64, 64) 0.99 / 0.58,
# (32, 4, 4, 64) 1.18 / 0.77, (32, 8, 8, 32) 1.40 / 1.25, (32, 8, 8, 64)
# 1.60 / 2.26; GroupNorm(8) (32, 4, 4, 64) 1.20 / 0.98, (32, 8, 8, 32)
# 1.27 / 2.19. A 12-layer MLP of width 64 at batch 64 trained 2.5x faster.
# In whole models the crossover is higher: inline plain ops fuse with their
# neighbours and cost no program call, so they win up to about 2^20 elements
# although a layer alone is faster on its XLA programs from about 2^17. One
# process, 6 interleaved rounds, Keras' plain training step ÷ ours at
# min_elements 2^16 / 2^18 / 2^20: MobileNetV2 (batch 32, 96x96) 1.24 / 1.19 /
# 1.28, EfficientNetB0 1.05 / 1.10 / 1.11, ResNet50 (16, 64x64) 1.04 / 1.02 /
# 1.02, DenseNet121 (16, 64x64) 0.92 / 0.90 / 1.00 (an earlier run: DenseNet121
# 0.96 at 2^16, 1.04 at 2^20).
DEFAULT_MIN_ELEMENTS = 1 << 20

_settings = {
    "warmup_calls": DEFAULT_WARMUP_CALLS,
    "max_shapes": DEFAULT_MAX_SHAPES,
    "min_elements": DEFAULT_MIN_ELEMENTS,
}
_lock = threading.Lock()

# A shape that reached the limit is stored with this count: it stays plain.
_REFUSED = -1
# Keys under which each table counts the shapes it has promoted to XLA, and
# keeps the id of its `ShapeUse` (which names the caller in the warning).
_PROMOTED_KEY = -1
_ID_KEY = -2


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Argument `{name}` must be an int >= 0. Received: {name}={value!r}")
    return value


def get_xla_policy():
    """The current `{"warmup_calls": int, "max_shapes": int, "min_elements": int}`."""
    return dict(_settings)


def set_xla_policy(warmup_calls=None, max_shapes=None, min_elements=None):
    """Sets when training kernels are XLA-compiled (for kernels traced from now on).

    Args:
      warmup_calls: int >= 0, default 50. Training calls at an input shape run
        the plain graph this many times before that shape is compiled; 0
        compiles at the first call. `ValueError` if negative or not an int.
      max_shapes: int >= 0, default 16. Shapes compiled per kernel and
        configuration; further shapes stay plain (a warning says so once). 0
        never compiles. `ValueError` if negative or not an int.
      min_elements: int >= 0, default 1048576 (2^20). Inputs with fewer elements are
        never compiled: their training calls run plain ops, inline in the
        caller's graph when the shape is known while tracing. 0 lets every
        size compile (except a `BatchNorm` under oneDNN, whose float32 NHWC
        inputs of at least 96 Ki elements and a shape known while tracing run
        TensorFlow's fused op inline: docs/xla.md). `ValueError` if negative
        or not an int.

    Graphs already traced keep the policy they were traced with.
    """
    updates = {}
    if warmup_calls is not None:
        updates["warmup_calls"] = _check_count(warmup_calls, "warmup_calls")
    if max_shapes is not None:
        updates["max_shapes"] = _check_count(max_shapes, "max_shapes")
    if min_elements is not None:
        updates["min_elements"] = _check_count(min_elements, "min_elements")
    _settings.update(updates)


@contextlib.contextmanager
def xla_policy(warmup_calls=None, max_shapes=None, min_elements=None):
    """`set_xla_policy` for the duration of a `with` block (tests, benchmarks)."""
    previous = get_xla_policy()
    set_xla_policy(warmup_calls, max_shapes, min_elements)
    try:
        yield
    finally:
        _settings.update(previous)


def _shape_key(shape):
    """An int64 fingerprint of a 1-D int32 shape tensor (a polynomial hash)."""
    shape = tf.cast(shape, tf.int64)
    rank = shape.shape[0]
    powers = tf.constant([1_000_003**i % (1 << 61) for i in range(rank)], tf.int64)
    return tf.reduce_sum(shape * powers) + rank  # wraps around on overflow: still a hash


_descriptions = {}
_ids = itertools.count(1)
_warned = set()


def _warn_once(caller_id):
    caller = int(caller_id.numpy())
    if caller not in _warned:
        _warned.add(caller)
        warnings.warn(
            f"kerasbn: {_descriptions.get(caller, 'a kernel')} has been XLA-compiled for "
            f"{_settings['max_shapes']} input shapes; new shapes run its plain TensorFlow "
            "graph (correct, slower). Pad inputs to a few fixed shapes, or raise the limit "
            "with kerasbn.kernels.set_xla_policy(max_shapes=...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return tf.constant(0)


class ShapeUse:
    """One caller's count of training calls per input shape (a layer keeps one).

    `handle()` is the count table's resource handle, which the kernel's
    dispatch program reads and updates (`decide`). The table is created at the
    first call (TensorFlow resources are made outside any function being
    traced). Copies start counting afresh.
    """

    def __init__(self, description):
        self.description = description
        self._id = next(_ids)
        _descriptions[self._id] = description
        self._table = None

    def __deepcopy__(self, memo):
        return ShapeUse(self.description)

    def __getstate__(self):
        return {"description": self.description}

    def __setstate__(self, state):
        self.__init__(state["description"])

    def handle(self):
        """The count table's resource handle (the table is made on first use)."""
        with _lock:
            if self._table is None:
                with tf.init_scope():
                    self._table = tf.lookup.experimental.MutableHashTable(
                        tf.int64, tf.int64, default_value=0, name="kerasbn_shape_use"
                    )
                    self._table.insert(tf.constant(_ID_KEY, tf.int64), tf.constant(self._id, tf.int64))
            return self._table.resource_handle


def _find(handle, key):
    return tf.raw_ops.LookupTableFindV2(
        table_handle=handle, keys=tf.constant(key, tf.int64) if isinstance(key, int) else key,
        default_value=tf.constant(0, tf.int64),
    )


def _insert(handle, key, value):
    key = tf.constant(key, tf.int64) if isinstance(key, int) else key
    return tf.raw_ops.LookupTableInsertV2(table_handle=handle, keys=key, values=value)


def decide(handle, x, warmup, limit, min_elements=0):
    """Counts this call and returns whether it runs the XLA programs (a bool tensor).

    Runs inside a kernel's dispatch program, traced once for every caller:
    the caller comes in as its table's `handle`, the policy (`warmup`,
    `limit`, `min_elements`: Python ints) as constants of the trace. An input
    under `min_elements` elements stays plain and takes no compile slot.
    """
    key = _shape_key(tf.shape(x))
    large = tf.size(x, out_type=tf.int64) >= min_elements
    previous = _find(handle, key)
    promoted = _find(handle, _PROMOTED_KEY)
    promoting = tf.logical_and(tf.equal(previous, warmup), large)
    refused = tf.logical_and(promoting, promoted >= limit)
    stays_plain = tf.logical_or(refused, tf.equal(previous, _REFUSED))
    count = tf.where(stays_plain, tf.constant(_REFUSED, tf.int64), previous + 1)
    promoted_now = tf.cast(tf.logical_and(promoting, tf.logical_not(refused)), tf.int64)
    updates = [
        _insert(handle, key, count),
        _insert(handle, _PROMOTED_KEY, promoted + promoted_now),
        tf.cond(
            refused,
            lambda: tf.py_function(_warn_once, [_find(handle, _ID_KEY)], tf.int32),
            lambda: tf.constant(0),
        ),
    ]
    with tf.control_dependencies(updates):
        return tf.logical_and(
            tf.logical_and(previous >= warmup, tf.logical_not(stays_plain)), large
        )
