"""Compiling kernels with or without XLA.

Every kernel exists twice: an XLA-compiled `tf.function` (the default) and a plain
graph `tf.function`. The plain one is used when the layer was built with
`jit_compile=False` and inside `jit_disabled()`, which the serving exporter enters
while it traces a model: stock TF Serving runs without XLA JIT and refuses
functions marked `_XlaMustCompile`.
"""

import contextlib
import threading

import tensorflow as tf

_state = threading.local()


def xla_allowed():
    """Whether kernels may be XLA-compiled in the current thread."""
    return not getattr(_state, "jit_disabled", False)


@contextlib.contextmanager
def jit_disabled():
    """Within this context, layers call the plain (non-XLA) kernels."""
    previous = getattr(_state, "jit_disabled", False)
    _state.jit_disabled = True
    try:
        yield
    finally:
        _state.jit_disabled = previous


class Kernel:
    """A pure function compiled twice: with XLA (`.xla`) and without (`.plain`).

    Both are traced with `reduce_retracing=True`, so a new batch size traces at
    most once more (with an unknown batch dimension) instead of once per size.
    """

    def __init__(self, fn):
        self.fn = fn
        self.xla = tf.function(fn, jit_compile=True, reduce_retracing=True)
        self.plain = tf.function(fn, jit_compile=False, reduce_retracing=True)
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def get(self, jit_compile):
        """The compiled function to call for a layer's `jit_compile` flag."""
        return self.xla if (jit_compile and xla_allowed()) else self.plain

    def __call__(self, *args, jit_compile=True, **kwargs):
        return self.get(jit_compile)(*args, **kwargs)


def kernel(fn):
    """Decorator: make `fn` a `Kernel`."""
    return Kernel(fn)
