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


class _PerRank:
    """One `tf.function` per rank of the first argument.

    `reduce_retracing=True` lets a new batch size trace at most once more (with
    an unknown batch dimension) instead of once per size; but fed two ranks it
    would relax the input to an unknown rank, which the kernels cannot reduce
    over. Keeping one function per rank keeps the rank static.
    """

    def __init__(self, fn, jit_compile):
        self._fn = fn
        self._jit_compile = jit_compile
        self._functions = {}

    def function_for_rank(self, rank):
        if rank not in self._functions:
            self._functions[rank] = tf.function(
                self._fn, jit_compile=self._jit_compile, reduce_retracing=True
            )
        return self._functions[rank]

    def __call__(self, x, *args, **kwargs):
        return self.function_for_rank(len(x.shape))(x, *args, **kwargs)

    def experimental_get_tracing_count(self):
        """Traces so far, over all ranks."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())


class Kernel:
    """A pure function compiled twice: with XLA (`.xla`) and without (`.plain`)."""

    def __init__(self, fn):
        self.fn = fn
        self.xla = _PerRank(fn, jit_compile=True)
        self.plain = _PerRank(fn, jit_compile=False)
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
