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
import threading
import warnings

import tensorflow as tf

DEFAULT_WARMUP_CALLS = 50
DEFAULT_MAX_SHAPES = 16

_settings = {"warmup_calls": DEFAULT_WARMUP_CALLS, "max_shapes": DEFAULT_MAX_SHAPES}
_lock = threading.Lock()

# A shape that reached the limit is stored with this count: it stays plain.
_REFUSED = -1
# Key under which each table counts the shapes it has promoted to XLA.
_PROMOTED_KEY = -1


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Argument `{name}` must be an int >= 0. Received: {name}={value!r}")
    return value


def get_xla_policy():
    """The current `{"warmup_calls": int, "max_shapes": int}`."""
    return dict(_settings)


def set_xla_policy(warmup_calls=None, max_shapes=None):
    """Sets when training kernels are XLA-compiled (for kernels traced from now on).

    Args:
      warmup_calls: int >= 0, default 50. Training calls at an input shape run
        the plain graph this many times before that shape is compiled; 0
        compiles at the first call. `ValueError` if negative or not an int.
      max_shapes: int >= 0, default 16. Shapes compiled per kernel and
        configuration; further shapes stay plain (a warning says so once). 0
        never compiles. `ValueError` if negative or not an int.

    Graphs already traced keep the policy they were traced with.
    """
    updates = {}
    if warmup_calls is not None:
        updates["warmup_calls"] = _check_count(warmup_calls, "warmup_calls")
    if max_shapes is not None:
        updates["max_shapes"] = _check_count(max_shapes, "max_shapes")
    _settings.update(updates)


@contextlib.contextmanager
def xla_policy(warmup_calls=None, max_shapes=None):
    """`set_xla_policy` for the duration of a `with` block (tests, benchmarks)."""
    previous = get_xla_policy()
    set_xla_policy(warmup_calls, max_shapes)
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


class ShapeUse:
    """Counts one caller's training calls per input shape (a layer keeps one).

    `is_compiled(x)` returns a scalar bool tensor: whether this call should use
    the XLA programs. The table is created at the first call (TensorFlow
    resources are made outside any function being traced). Copies start
    counting afresh.
    """

    def __init__(self, description):
        self.description = description
        self._table = None
        self._warned = False

    def __deepcopy__(self, memo):
        return ShapeUse(self.description)

    def __getstate__(self):
        return {"description": self.description}

    def __setstate__(self, state):
        self.__init__(state["description"])

    def _resource(self):
        with _lock:
            if self._table is None:
                with tf.init_scope():
                    self._table = tf.lookup.experimental.MutableHashTable(
                        tf.int64, tf.int64, default_value=0, name="kerasbn_shape_use"
                    )
            return self._table

    def _warn_once(self):
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"kerasbn: {self.description} has been XLA-compiled for "
                f"{_settings['max_shapes']} input shapes; new shapes run its plain TensorFlow "
                "graph (correct, slower). Pad inputs to a few fixed shapes, or raise the limit "
                "with kerasbn.kernels.set_xla_policy(max_shapes=...).",
                RuntimeWarning,
                stacklevel=2,
            )
        return tf.constant(0)

    def is_compiled(self, x):
        table = self._resource()
        warmup = tf.constant(_settings["warmup_calls"], tf.int64)
        limit = tf.constant(_settings["max_shapes"], tf.int64)
        key = _shape_key(tf.shape(x))
        previous = table.lookup(key)
        promoted = table.lookup(tf.constant(_PROMOTED_KEY, tf.int64))
        promoting = tf.equal(previous, warmup)
        refused = tf.logical_and(promoting, promoted >= limit)
        known_refused = tf.equal(previous, _REFUSED)
        count = tf.where(tf.logical_or(refused, known_refused), tf.constant(_REFUSED, tf.int64), previous + 1)
        updates = [table.insert(key, count)]
        updates.append(
            table.insert(
                tf.constant(_PROMOTED_KEY, tf.int64),
                promoted + tf.cast(tf.logical_and(promoting, tf.logical_not(refused)), tf.int64),
            )
        )
        with tf.control_dependencies(updates):
            compiled = tf.logical_and(previous >= warmup, tf.not_equal(count, _REFUSED))
            warn = tf.cond(
                refused,
                lambda: tf.py_function(self._warn_once, [], tf.int32),
                lambda: tf.constant(0),
            )
        with tf.control_dependencies([warn]):
            return tf.identity(compiled)
