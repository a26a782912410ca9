"""When a training call is worth its XLA programs: shapes that recur, counted at run time.

XLA compiles a program once per input shape, which costs far more than one call saves
(docs/decisions/001-xla-only-for-recurring-shapes.md). So a training kernel called outside an
XLA-compiled function runs its plain graph at a new input shape until that shape has been used
`Policy.warmup_calls` times, and at most `Policy.max_shapes` shapes are compiled per layer (further
shapes stay plain, with a one-time warning). Each layer counts its own calls (`ShapeUse`) in a
table the training graph itself updates: the decision is taken per call, for the shape actually
seen (a trace with an unknown batch size sees them all); XLA caches the programs by shape.
"""

import itertools
import threading
import warnings

import tensorflow as tf

_lock = threading.Lock()

_REFUSED = -1  # the count stored for a shape refused at the limit: it stays plain
_PROMOTED_KEY = -1  # the key of a table's count of the shapes it promoted to XLA
_ID_KEY = -2  # the key of its `ShapeUse`'s id, which names the caller in the warning


def _shape_key(shape):
    """An int64 fingerprint of a 1-D int32 shape tensor (a polynomial hash)."""
    shape = tf.cast(shape, tf.int64)
    rank = shape.shape[0]
    powers = tf.constant([1_000_003**i % (1 << 61) for i in range(rank)], tf.int64)
    return tf.reduce_sum(shape * powers) + rank  # wraps around on overflow: still a hash


_descriptions = {}
_ids = itertools.count(1)
_warned = set()


def _warn_once(caller_id, limit):
    caller = int(caller_id.numpy())
    if caller not in _warned:
        _warned.add(caller)
        warnings.warn(
            f"kerasbn: {_descriptions.get(caller, 'a kernel')} has been XLA-compiled for "
            f"{int(limit.numpy())} input shapes; new shapes run its plain TensorFlow "
            "graph (correct, slower). Pad inputs to a few fixed shapes, or raise the limit "
            "with kerasbn.kernels.set_xla_policy(max_shapes=...).",
            RuntimeWarning,
            stacklevel=2,
        )
    return tf.constant(0)


class ShapeUse:
    """One caller's count of training calls per input shape (a layer keeps one); `description`
    names it in the warning. Copies and unpickled ones start counting afresh."""

    def __init__(self, description):
        self.description = description
        self._id = next(_ids)
        _descriptions[self._id] = description
        self._table = None

    def __reduce__(self):
        return ShapeUse, (self.description,)

    def handle(self):
        """The count table's resource handle, which the kernel's dispatch program reads and updates
        (`decide`); the table is made at the first call, outside any function being traced."""
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
    """Counts this call and returns whether it runs the XLA programs (a bool tensor). Traced in a
    kernel's dispatch program once for every caller, whose table comes in as `handle`, the policy
    (`warmup`, `limit`, `min_elements`: Python ints) as constants; an input under `min_elements`
    elements stays plain and takes no compile slot."""
    key = _shape_key(tf.shape(x))
    large = tf.size(x, out_type=tf.int64) >= min_elements
    previous = _find(handle, key)
    promoted = _find(handle, _PROMOTED_KEY)
    promoting = tf.logical_and(tf.equal(previous, warmup), large)
    refused = tf.logical_and(promoting, promoted >= limit)
    stays_plain = tf.logical_or(refused, tf.equal(previous, _REFUSED))
    count = tf.where(stays_plain, tf.constant(_REFUSED, tf.int64), previous + 1)
    promoted_now = tf.cast(tf.logical_and(promoting, tf.logical_not(refused)), tf.int64)

    def warn():
        return tf.py_function(_warn_once, [_find(handle, _ID_KEY), tf.constant(limit, tf.int64)], tf.int32)

    updates = [
        _insert(handle, key, count),
        _insert(handle, _PROMOTED_KEY, promoted + promoted_now),
        tf.cond(refused, warn, lambda: tf.constant(0)),
    ]
    with tf.control_dependencies(updates):
        return tf.logical_and(tf.logical_and(previous >= warmup, tf.logical_not(stays_plain)), large)
