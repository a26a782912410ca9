"""Compiling kernels with or without XLA, and choosing between them per call.

Every kernel exists twice: XLA-compiled `tf.function`s and plain graph
`tf.function`s. XLA compiles once per concrete input shape, so the XLA
programs run only where that pays (see `Kernel`): training calls at input
shapes that recur (`warmup.py`). The plain graph runs everywhere else:
inference and other calls without a gradient, shapes not (yet) worth a
compilation, layers built with `jit_compile=False`, inside `jit_disabled()`
(which the serving exporter enters: stock TF Serving runs without XLA JIT and
refuses functions marked `_XlaMustCompile`), and inside an XLA-compiled
caller, whose compiler compiles the kernel together with the rest of the step.

Forward and backward are compiled as two programs. Differentiating a call of a
`tf.function` the usual way makes TensorFlow add every tensor the backward needs
to the forward function's outputs, the input `x` included; an XLA program cannot
return its own parameter without copying it, so each training step paid two
full copies of `x` (time, and memory the size of the input twice). Instead, when
a gradient tape is recording, a kernel call is wrapped in a `tf.custom_gradient`
at the caller's level: the forward program is called on gradient-stopped inputs
(so the tape records nothing inside it) and returns, besides its outputs, the
small intermediates marked with `residual()` (the batch statistics); the
backward program re-traces the kernel with those residuals fed back in and
takes its symbolic gradient (`tf.gradients`), so the statistics are not
recomputed (XLA drops the dead forward work), and takes `x` from the caller.
Inside an outer XLA-compiled step both programs are inlined into it and fused
with their neighbours.

Second-order gradients (a gradient penalty, Hessian-vector products): the
backward program takes the statistics as constants, so differentiating it
again would miss how they depend on `x`. When a tape or a forward accumulator
records the gradient computation itself, the gradient is instead TensorFlow's
autodiff of the kernel built in `differentiable_statistics()` mode, where the
statistics are ordinary differentiable functions of `x` and no hand-derived
gradient is used; the recording then differentiates it exactly, to any order.
Plain training never takes this path.
"""

import contextlib
import threading

import tensorflow as tf

from kerasbn.kernels import tf_internals, warmup

_state = threading.local()


def xla_allowed():
    """Whether kernels may be XLA-compiled in the current thread."""
    return not getattr(_state, "jit_disabled", False)


@contextlib.contextmanager
def _thread_flag(name):
    """Sets the thread-local flag `name` for the duration of the context."""
    previous = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, previous)


def jit_disabled():
    """Within this context, layers call the plain (non-XLA) kernels."""
    return _thread_flag("jit_disabled")


def differentiable_statistics():
    """Within this context kernels build plain differentiable graphs.

    The batch statistics keep their gradient and no `tf.custom_gradient` is
    used, so TensorFlow's autodiff of a kernel is its exact derivative to any
    order. Slower; used only to differentiate a gradient.
    """
    return _thread_flag("differentiable_statistics")


def statistics_are_differentiable():
    """Whether kernels are being built in `differentiable_statistics()` mode."""
    return getattr(_state, "differentiable_statistics", False)


# -- residuals ------------------------------------------------------------------


class _Residuals:
    """Records (forward) or replays (backward) the tensors passed to `residual`."""

    def __init__(self, saved=None):
        self.saved = saved
        self.recorded = []

    def take(self, tensor):
        if self.saved is None:
            self.recorded.append(tensor)
            return tensor
        position = len(self.recorded)
        self.recorded.append(tensor)
        value = self.saved[position]
        if value.dtype != tensor.dtype or value.shape.rank != tensor.shape.rank:
            raise ValueError("residuals replayed out of order")
        return value


@contextlib.contextmanager
def _residual_scope(saved=None):
    previous = getattr(_state, "residuals", None)
    scope = _Residuals(saved)
    _state.residuals = scope
    try:
        yield scope
    finally:
        _state.residuals = previous


def residual(tensor):
    """Marks an intermediate the backward program receives instead of recomputing.

    Only for values that carry no gradient (statistics under `stop_gradient`)
    and are small: they become extra outputs of the forward program. Outside a
    kernel this is the identity.
    """
    scope = getattr(_state, "residuals", None)
    return tensor if scope is None else scope.take(tensor)


# -- compiled functions ------------------------------------------------------------


class _PerRank:
    """One `tf.function` per rank of the input `x`.

    `reduce_retracing=True` lets a new batch size trace at most once more (with
    an unknown batch dimension) instead of once per size; but fed two ranks it
    would relax the input to an unknown rank, which the kernels cannot reduce
    over. Keeping one function per rank keeps the rank static.
    """

    def __init__(self, fn, jit_compile, rank_of):
        self._fn = fn
        self._jit_compile = jit_compile
        self._rank_of = rank_of
        self._functions = {}

    def function_for_rank(self, rank):
        if rank not in self._functions:
            self._functions[rank] = tf.function(
                self._fn, jit_compile=self._jit_compile, reduce_retracing=True
            )
        return self._functions[rank]

    def __call__(self, *args, **kwargs):
        return self.function_for_rank(self._rank_of(*args, **kwargs))(*args, **kwargs)

    def experimental_get_tracing_count(self):
        """Traces so far, over all ranks."""
        return sum(f.experimental_get_tracing_count() for f in self._functions.values())


def _differentiable(value):
    return tf.is_tensor(value) and value.dtype.is_floating


def _forward_program(fn):
    def forward(*args, **kwargs):
        with _residual_scope() as scope:
            outputs = fn(*args, **kwargs)
        return outputs, list(scope.recorded)

    forward.__name__ = f"forward_{fn.__name__}"
    return forward


def _backward_program(fn):
    def backward(args, kwargs, residuals, upstream):
        sources = [v for v in tf.nest.flatten((args, kwargs)) if _differentiable(v)]
        with _residual_scope(residuals):
            outputs = fn(*args, **kwargs)
        # Symbolic gradients, not a tape: a tape records nothing when this
        # function is first traced while the thread's taping is paused (as
        # inside a ForwardAccumulator), and the trace would be reused. Zeros
        # for unconnected sources, so the XLA and plain programs return the
        # same structure (they are the two branches of a `tf.cond`).
        return tf.gradients(
            tf.nest.flatten(outputs),
            sources,
            grad_ys=upstream,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    backward.__name__ = f"backward_{fn.__name__}"
    return backward


def _with_sources(args, kwargs, positions, sources):
    """`(args, kwargs)` with the differentiable leaves at `positions` replaced."""
    flat = tf.nest.flatten((args, kwargs))
    for position, source in zip(positions, sources):
        flat[position] = source
    return tf.nest.pack_sequence_as((args, kwargs), flat)


def _autodiff_gradients(fn, args, kwargs, positions, sources, upstream):
    """`fn`'s vector-Jacobian product by TensorFlow's autodiff, as recordable ops.

    `fn` is built in `differentiable_statistics()` mode, so every op from the
    sources to the gradients is an ordinary differentiable op: a tape or a
    forward accumulator recording this computation differentiates it exactly.
    """
    with differentiable_statistics():
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(sources)
            call_args, call_kwargs = _with_sources(args, kwargs, positions, sources)
            outputs = fn(*call_args, **call_kwargs)
    return tape.gradient(
        tf.nest.flatten(outputs),
        list(sources),
        output_gradients=list(upstream),
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )


class _Programs:
    """A kernel's forward and backward programs, compiled one way (XLA or plain)."""

    def __init__(self, fn, jit_compile):
        self.forward = _PerRank(
            _forward_program(fn), jit_compile, lambda x, *args, **kwargs: len(x.shape)
        )
        self.backward = _PerRank(
            _backward_program(fn), jit_compile, lambda args, *rest: len(args[0].shape)
        )

    def experimental_get_tracing_count(self):
        return (
            self.forward.experimental_get_tracing_count()
            + self.backward.experimental_get_tracing_count()
        )


def _select(compiled, if_xla, if_plain):
    """`if_xla()` or `if_plain()`: statically when `compiled` is a bool, else a `tf.cond`."""
    if isinstance(compiled, bool):
        return if_xla() if compiled else if_plain()
    return tf.cond(compiled, if_xla, if_plain)


def _configuration_key(args, kwargs):
    """What, besides the input shapes, makes two calls compile to different programs."""
    flat = tf.nest.flatten((args, kwargs))
    structure = tf.nest.map_structure(lambda _: 0, (args, kwargs))
    tensors = tuple(
        (v.dtype.name, v.shape.rank) if tf.is_tensor(v) else ("static", repr(v)) for v in flat
    )
    return repr(structure), tensors


class Kernel:
    """A pure function compiled twice, with XLA and without, called where each pays.

    Calling it (`kernel(*args, jit_compile=True, **kwargs)`, or the function
    `kernel.get(jit_compile)`) picks, while the caller is traced:

    - the plain graph when `jit_compile` is False, inside `jit_disabled()`, and
      inside an XLA-compiled caller (whose compiler then compiles the kernel
      with the rest of the step: no program of its own);
    - the plain graph when no gradient is recorded (inference, a forward-only
      pass): nothing is compiled for the shapes inference sees;
    - for a training call (a gradient tape records it), the XLA programs for
      input shapes that recur and the plain graph for the others, decided at
      run time per call (`warmup.ShapeUse`).
    """

    def __init__(self, fn):
        self.fn = fn
        self.xla = _Programs(fn, jit_compile=True)
        self.plain = _Programs(fn, jit_compile=False)
        self._shape_use = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def get(self, jit_compile, shape_use=None):
        """The kernel as a function, for a layer's `jit_compile` flag.

        `shape_use` is the caller's `warmup.ShapeUse` (a layer keeps its own,
        so its limit counts its own shapes); None shares one per configuration.
        """

        def call(*args, **kwargs):
            return self(*args, jit_compile=jit_compile, shape_use=shape_use, **kwargs)

        return call

    def __call__(self, *args, jit_compile=True, shape_use=None, **kwargs):
        args, kwargs = tf.nest.map_structure(
            lambda v: tf.convert_to_tensor(v) if isinstance(v, tf.Variable) else v,
            (args, kwargs),
        )
        flat = tf.nest.flatten((args, kwargs))
        positions = [i for i, value in enumerate(flat) if _differentiable(value)]
        sources = [flat[i] for i in positions]
        if sources and tf_internals.forward_accumulator_watches(sources):
            # Under a forward accumulator (JVPs, forward-over-backward
            # Hessian-vector products): plain differentiable ops throughout.
            with differentiable_statistics():
                return self.fn(*args, **kwargs)
        if not sources or not tf_internals.gradient_recorded(sources, unknown=True):
            outputs, _ = self.plain.forward(*args, **kwargs)
            return outputs
        compiled = self._compiled(args, kwargs, jit_compile, shape_use)
        return self._call_recorded(args, kwargs, positions, sources, compiled)

    def _compiled(self, args, kwargs, jit_compile, shape_use):
        """False, or a bool tensor: whether this training call runs the XLA programs."""
        if not jit_compile or not xla_allowed() or tf_internals.in_xla_context():
            return False
        if shape_use is None:
            key = _configuration_key(args, kwargs)
            if key not in self._shape_use:
                self._shape_use[key] = warmup.ShapeUse(f"kernel {self.__name__} (configuration {len(self._shape_use)})")
            shape_use = self._shape_use[key]
        return shape_use.is_compiled(args[0])

    def _call_recorded(self, args, kwargs, positions, sources, compiled):
        @tf.custom_gradient
        def run(*sources):
            stopped_args, stopped_kwargs = _with_sources(
                args, kwargs, positions, [tf.stop_gradient(source) for source in sources]
            )
            outputs, residuals = _select(
                compiled,
                lambda: self.xla.forward(*stopped_args, **stopped_kwargs),
                lambda: self.plain.forward(*stopped_args, **stopped_kwargs),
            )
            flat_outputs = tf.nest.flatten(outputs)

            def grad(*upstream, variables=None):
                upstream = [
                    tf.zeros_like(output) if g is None else g
                    for g, output in zip(upstream, flat_outputs)
                ]
                grads = self._gradients(
                    args, kwargs, positions, sources, residuals, upstream, compiled
                )
                if variables:
                    return grads, [None] * len(variables)
                return grads

            return outputs, grad

        return run(*sources)

    def _gradients(self, args, kwargs, positions, sources, residuals, upstream, compiled):
        """The backward program's gradients; exactly differentiable when recorded.

        Recorded means that a gradient tape (or a forward accumulator started
        after the forward pass) watches the sources or the upstream gradients.
        """
        if not tf_internals.gradient_possibly_watched(list(sources) + list(upstream)):
            return list(
                _select(
                    compiled,
                    lambda: self.xla.backward(args, kwargs, residuals, upstream),
                    lambda: self.plain.backward(args, kwargs, residuals, upstream),
                )
            )
        return _autodiff_gradients(self.fn, args, kwargs, positions, sources, upstream)

    def experimental_get_tracing_count(self):
        """Traces so far of the forward and backward programs, XLA and plain, all ranks."""
        return self.xla.experimental_get_tracing_count() + self.plain.experimental_get_tracing_count()


def kernel(fn):
    """Decorator: make `fn` a `Kernel`."""
    return Kernel(fn)
