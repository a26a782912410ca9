"""Compiling kernels with or without XLA, and choosing between them per call.

Every kernel exists as XLA-compiled `tf.function`s and as plain graph
`tf.function`s. XLA compiles once per concrete input shape, so the XLA
programs run only where that pays (see `Kernel`): training calls at input
shapes that recur and are not small (`warmup.py`). Calls without a gradient
(inference), and training calls on inputs known to be small, add the
kernel's ops inline to the caller's graph, where TensorFlow's graph optimizer
treats them as Keras' layers' ops; run eagerly, they call one plain program
instead. The plain programs run for other training calls at shapes not (yet)
worth a compilation, layers built with `jit_compile=False`, inside
`jit_disabled()` (which the serving exporter enters: stock TF Serving runs
without XLA JIT and refuses functions marked `_XlaMustCompile`), and inside an
XLA-compiled caller, whose compiler compiles the kernel together with the rest
of the step. What is built for XLA and what for TensorFlow's executor differs
in how it sums (`built_for_xla`, `moments.sum_over`) and in whether a fused
activation's backward recomputes its input or keeps it (`normalize.py`).

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
Plain training never takes this path. A call that no tape records at all
(inference, an export) is built in that mode too: nothing needs the
hand-derived gradient there, and the plain form is the smallest graph.
"""

import contextlib
import numbers
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
    order. Slower to differentiate; used to differentiate a gradient, and for
    calls no tape records (where it is the smallest graph).
    """
    return _thread_flag("differentiable_statistics")


def statistics_are_differentiable():
    """Whether kernels are being built in `differentiable_statistics()` mode."""
    return getattr(_state, "differentiable_statistics", False)


def _untaped():
    """Within this context kernels are built for a call no tape records."""
    return _thread_flag("untaped")


def built_untaped():
    """Whether the kernel being built now is a call no tape records, in a graph
    TensorFlow runs op by op (`predict` on a CPU, an export).

    Such a graph may still be differentiated later (a concrete function called
    under a tape, `tf.gradients`): kernels built here use only ops with
    TensorFlow gradients of their own, but may rely on them (TensorFlow's
    `FusedBatchNormV3` at inference has gradients for x, γ and β, none for
    the moving statistics).
    """
    return getattr(_state, "untaped", False)


def built_for_xla():
    """Whether the kernel being built now will be compiled by XLA.

    `moments.sum_over` arranges its sums for XLA's CPU backend (blocked sums
    and matrix products); in a graph that TensorFlow runs op by op, one
    `tf.reduce_sum` is fewer and faster ops. Fused activations likewise
    recompute their input for XLA and keep it otherwise. True unless a caller
    here says otherwise (`_building`), so a kernel function called directly
    gets the form that is right in both.
    """
    return not getattr(_state, "plain_graph", False)


@contextlib.contextmanager
def _building(for_xla):
    """Within this context kernels are built for XLA (`for_xla`) or not."""
    previous = getattr(_state, "plain_graph", False)
    _state.plain_graph = not for_xla
    try:
        yield
    finally:
        _state.plain_graph = previous


def _built(fn, for_xla):
    """`fn`, building its ops for XLA or not (see `built_for_xla`)."""

    def build(*args, **kwargs):
        with _building(for_xla):
            return fn(*args, **kwargs)

    build.__name__ = fn.__name__
    return build


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


def _relaxed(value):
    """A tensor's spec with every dimension unknown (rank kept); other values as they are."""
    if tf.is_tensor(value):
        rank = value.shape.rank
        return tf.TensorSpec(None if rank is None else [None] * rank, value.dtype)
    return value


def _signature_key(args, kwargs):
    """What selects a trace: the structure, each tensor's dtype and rank, the other values."""
    flat = tf.nest.flatten((args, kwargs))
    structure = tf.nest.map_structure(lambda _: 0, (args, kwargs))
    leaves = tuple(
        (v.dtype.name, v.shape.rank) if tf.is_tensor(v) else ("static", repr(v)) for v in flat
    )
    return repr(structure), leaves


def _with_static_shape(outputs, x):
    """`outputs` with the first (the normalized tensor) given `x`'s static shape.

    A program traced with every dimension unknown returns it without; callers
    that read static shapes (Keras 3.10's `Flatten`, say) need it.
    """
    first = tf.nest.flatten(outputs)[0]
    if tf.is_tensor(x) and first.shape.rank == x.shape.rank:
        first.set_shape(x.shape)
    return outputs


class _Program:
    """A `tf.function` traced once per signature, with every dimension unknown.

    A kernel is traced for the dtypes and ranks of its tensors and the values
    of its other arguments, never for sizes: one trace serves every layer of a
    model and every batch size (XLA still compiles per concrete shape; the
    plain graph runs as it is). Tracing costs about a millisecond per op, and a
    kernel has hundreds, so this keeps a model's first step short.

    `autograph=False`: the kernels branch only on Python values known while
    tracing, so AutoGraph's source conversion has nothing to do.
    """

    def __init__(self, fn, jit_compile, for_xla=None):
        """`for_xla`: whether XLA compiles the trace (default: `jit_compile`);
        True also for a plain program called inside an XLA-compiled caller."""
        self._function = tf.function(
            _built(fn, jit_compile if for_xla is None else for_xla),
            jit_compile=jit_compile,
            autograph=False,
            experimental_attributes={"_noinline": True},
        )
        self._traces = {}

    def __call__(self, *args, **kwargs):
        key = _signature_key(args, kwargs)
        trace = self._traces.get(key)
        if trace is None:
            specs, kw_specs = tf.nest.map_structure(_relaxed, (args, kwargs))
            trace = self._function.get_concrete_function(*specs, **kw_specs)
            self._traces[key] = trace
        return trace(*args, **kwargs)

    def experimental_get_tracing_count(self):
        """Traces so far."""
        return self._function.experimental_get_tracing_count()


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
    def backward(args, kwargs, residuals, upstream, positions, upstream_positions):
        """Gradients of the sources at `positions` (of the flattened arguments),
        given the gradients `upstream` of the outputs at `upstream_positions`
        (the others have none: zeros fed in would be constants, which also make
        the graph optimizer copy the program per call site)."""
        flat = tf.nest.flatten((args, kwargs))
        sources = [flat[i] for i in positions]
        with _residual_scope(residuals):
            outputs = fn(*args, **kwargs)
        outputs = [tf.nest.flatten(outputs)[i] for i in upstream_positions]
        # Symbolic gradients, not a tape: a tape records nothing when this
        # function is first traced while the thread's taping is paused (as
        # inside a ForwardAccumulator), and the trace would be reused. Zeros
        # for unconnected sources, so the XLA and plain programs return the
        # same structure (they are the two branches of a `tf.cond`).
        return tf.gradients(
            outputs,
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
    pairs = [(o, g) for o, g in zip(tf.nest.flatten(outputs), upstream) if g is not None]
    return tape.gradient(
        [o for o, _ in pairs],
        list(sources),
        output_gradients=[g for _, g in pairs],
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )


# Which of a kernel's flattened outputs carry a gradient: the normalized
# tensor, which every kernel returns first; the rest are statistics.
GRADIENT_OUTPUTS = (0,)


class _Programs:
    """A kernel's forward and backward programs, compiled one way (XLA or plain)."""

    def __init__(self, fn, jit_compile, for_xla=None):
        self.forward = _Program(_forward_program(fn), jit_compile, for_xla)
        self.backward = _Program(_backward_program(fn), jit_compile, for_xla)

    def experimental_get_tracing_count(self):
        return (
            self.forward.experimental_get_tracing_count()
            + self.backward.experimental_get_tracing_count()
        )


class _Taped:
    """What an inline forward keeps for its backward: its tape, inputs, outputs."""

    def __init__(self, tape, inputs, outputs):
        self.tape, self.inputs, self.outputs = tape, inputs, outputs


class _InlineOps:
    """A kernel's forward and backward as plain ops added to the caller's graph.

    No program call, and TensorFlow's graph optimizer sees the ops with the
    caller's static shapes. Unlike the programs' backward, which re-traces the
    kernel with its residuals fed back in, the forward runs the kernel once
    under a tape of its own and the backward asks that tape for the gradient:
    the kernel's hand-derived gradient is built on the forward's tensors, and
    the kernel is traced once, not twice (the ops of a model's first step are
    traced one by one, at about a millisecond each).
    """

    def __init__(self, fn):
        self.fn = fn

    def forward(self, *args, **kwargs):
        inputs = tf.nest.flatten((args, kwargs))
        # Persistent: a persistent outer tape may ask for the gradient twice.
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        with tape, _building(for_xla=False):
            tape.watch([value for value in inputs if _differentiable(value)])
            outputs = self.fn(*args, **kwargs)
        return outputs, _Taped(tape, inputs, tf.nest.flatten(outputs))

    @staticmethod
    def backward(args, kwargs, taped, upstream, positions, upstream_positions):
        """The same arguments as the programs' backward, `taped` for their residuals."""
        del args, kwargs  # the tape holds the forward's own inputs
        with _building(for_xla=False):
            return taped.tape.gradient(
                [taped.outputs[i] for i in upstream_positions],
                [taped.inputs[i] for i in positions],
                output_gradients=list(upstream),
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )


class _Dispatch:
    """Programs that count a training call and run the XLA or the plain programs.

    Everything about the decision (`warmup.decide`) and the `tf.cond` between
    the two lives inside these plain, non-inlined functions, traced once per
    signature and shared by every layer: a layer's call adds a single function
    call to the caller's graph, with its count table as an input. The forward
    also returns its decision, which the backward takes.
    """

    def __init__(self, fn, xla):
        # The dispatch programs and their plain branches are built for
        # TensorFlow's executor; the XLA programs trace themselves for XLA.
        plain_forward, plain_backward = _forward_program(fn), _backward_program(fn)

        def forward(handle, *args, warmup_calls, max_shapes, min_elements, **kwargs):
            compiled = warmup.decide(handle, args[0], warmup_calls, max_shapes, min_elements)
            outputs, residuals = tf.cond(
                compiled,
                lambda: xla.forward(*args, **kwargs),
                lambda: plain_forward(*args, **kwargs),
            )
            return outputs, residuals, compiled

        def backward(compiled, *args):
            return tf.cond(compiled, lambda: xla.backward(*args), lambda: plain_backward(*args))

        forward.__name__ = f"dispatch_forward_{fn.__name__}"
        backward.__name__ = f"dispatch_backward_{fn.__name__}"
        self.forward = _Program(forward, jit_compile=False)
        self.backward = _Program(backward, jit_compile=False)

    def experimental_get_tracing_count(self):
        return (
            self.forward.experimental_get_tracing_count()
            + self.backward.experimental_get_tracing_count()
        )


class Kernel:
    """A pure function compiled twice, with XLA and without, called where each pays.

    Calling it (`kernel(*args, jit_compile=True, **kwargs)`, or the function
    `kernel.get(jit_compile)`) picks, while the caller is traced:

    - the plain graph when `jit_compile` is False, inside `jit_disabled()`, and
      inside an XLA-compiled caller (whose compiler then compiles the kernel
      with the rest of the step: no program of its own);
    - the plain graph when no gradient is recorded (inference, a forward-only
      pass): nothing is compiled for the shapes inference sees;
    - for a training call on an input known while tracing to be smaller than
      the policy's `min_elements`, plain ops inline in the caller's graph (no
      program call: its fixed cost is most of the time at that size), and at
      any size where the kernel's `inline_when` says so;
    - for other training calls (a gradient tape records them), the XLA
      programs for input shapes that recur and the plain graph for the
      others, decided at run time per call (`warmup.ShapeUse`).
    """

    def __init__(self, fn, per_layer_ints=(), inline_when=None):
        self.fn = fn
        self._per_layer_ints = tuple(per_layer_ints)
        self._inline_when = inline_when
        self.xla = _Programs(fn, jit_compile=True)
        self.plain = _Programs(fn, jit_compile=False)
        # Plain programs built for the enclosing XLA-compiled caller.
        self.nested = _Programs(fn, jit_compile=False, for_xla=True)
        self.inline = _InlineOps(fn)
        self.dispatch = _Dispatch(fn, self.xla)
        self.eager = _Program(fn, jit_compile=False)
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
        differentiable = [i for i, value in enumerate(flat) if _differentiable(value)]
        if differentiable and tf_internals.forward_accumulator_watches(
            [flat[i] for i in differentiable]
        ):
            # Under a forward accumulator (JVPs, forward-over-backward
            # Hessian-vector products): plain differentiable ops throughout.
            with differentiable_statistics():
                return self.fn(*args, **kwargs)
        # The sources of the gradient: what a tape records (the input, the
        # trainable weights), not e.g. the moving statistics. The backward
        # returns a gradient for these only: an unused output would make the
        # graph optimizer copy the program for every call site.
        positions = tuple(
            i for i in differentiable if tf_internals.gradient_recorded([flat[i]], unknown=True)
        )
        if not positions:
            # Inline plain ops in the caller's graph: TensorFlow's graph
            # optimizer fuses them with their neighbours as it does Keras'
            # layers' ops; a function call of its own would cost its call
            # and block those fusions (measured: predict of a converted
            # MobileNetV2 126 ms against Keras' 100 ms that way). Eagerly
            # there is no caller's graph: one plain program call instead of
            # a hundred small eager ops (measured: a training-mode call of
            # BatchNorm on (32, 1) without a tape took 21 ms op by op).
            if tf.executing_eagerly():
                return self.eager(*args, **self._for_programs(kwargs))
            if tf_internals.in_xla_context():
                # The caller's compiler takes these ops; under stop_gradient
                # in case the caller is differentiated from outside (see
                # `moments.moments`).
                with _building(for_xla=True):
                    return self.fn(*args, **kwargs)
            # No tape records these ops, so they need no custom gradient and
            # no stop_gradient: the plain differentiable form is the smallest
            # graph, and tracing it is what a new batch size costs at
            # inference (a GroupNorm's inference added 66 graph ops with the
            # custom gradient and shape arithmetic, now 30; Keras' own 40).
            with _building(for_xla=False), differentiable_statistics(), _untaped():
                return self.fn(*args, **kwargs)
        sources = [flat[i] for i in positions]
        gate = self._gate(args, kwargs, jit_compile, shape_use)
        if gate is not self.inline and gate is not self.nested:
            kwargs = self._for_programs(kwargs)
        return self._call_recorded(args, kwargs, positions, sources, gate)

    def _for_programs(self, kwargs):
        """`kwargs` with the per-layer ints (`per_layer_ints`) as run-time tensors.

        As Python values they would be part of the programs' signature: one
        trace of every program per value (a GroupNorm per group count). As
        `tf.constant`s, TensorFlow's function optimizer would copy and
        specialise the programs at every call site. A `PlaceholderWithDefault`
        is a constant that optimizer does not see through: one trace, one
        optimized program for every layer (measured: the first training step
        of a MobileNetV2 with 52 GroupNorms of 12 group counts took 38 s with
        Python ints, 36 s with constants, 10 s this way; Keras' own 13 s).
        XLA still compiles per value, which it reads when the program runs.
        Inline ops and programs built for an XLA caller take the Python ints
        (the latter are traced per value, once per jit-compiled step).
        """
        if not self._per_layer_ints:
            return kwargs
        kwargs = dict(kwargs)
        for name in self._per_layer_ints:
            value = kwargs.get(name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                kwargs[name] = tf.raw_ops.PlaceholderWithDefault(
                    input=tf.constant(int(value), tf.int32), shape=[]
                )
        return kwargs

    def _gate(self, args, kwargs, jit_compile, shape_use):
        """How a training call runs: the forward and backward of `self.nested`,
        `self.inline` or `self.plain` (see `Kernel`), or the `ShapeUse` whose
        counts decide per call between the XLA and the plain programs."""
        if tf_internals.in_xla_context():
            return self.nested
        x = args[0]
        static = x.shape.is_fully_defined()
        small = static and x.shape.num_elements() < warmup.get_xla_policy()["min_elements"]
        # Inline at any size where the kernel says its plain ops beat XLA
        # (`inline_when`: BatchNorm as TensorFlow's fused op under oneDNN,
        # from 96 Ki elements).
        inline = small or (
            static and self._inline_when is not None and self._inline_when(*args, **kwargs)
        )
        # Not under a distribution strategy: there the replicas' graphs are
        # built side by side in one graph with different static shapes, and
        # TensorFlow's graph optimizer rewrote inline ghost-batch ops wrongly
        # (MirroredStrategy, replicas of 6 and 10 masked examples: a reshape
        # of 120 values to 4); the programs, traced with relaxed shapes, work.
        if inline and not tf.executing_eagerly() and not tf.distribute.has_strategy():
            return self.inline
        if small or not jit_compile or not xla_allowed():
            return self.plain
        if shape_use is None:
            key = _signature_key(args, kwargs)
            if key not in self._shape_use:
                description = f"kernel {self.__name__} (configuration {len(self._shape_use)})"
                self._shape_use[key] = warmup.ShapeUse(description)
            shape_use = self._shape_use[key]
        return shape_use

    def _call_recorded(self, args, kwargs, positions, sources, gate):
        @tf.custom_gradient
        def run(*sources):
            stopped_args, stopped_kwargs = _with_sources(
                args, kwargs, positions, [tf.stop_gradient(source) for source in sources]
            )
            # `route`: what the backward runs, the same ops as the forward or,
            # after the dispatch, its run-time decision (a bool tensor).
            if not isinstance(gate, warmup.ShapeUse):
                outputs, residuals = gate.forward(*stopped_args, **stopped_kwargs)
                route = gate
            else:
                policy = warmup.get_xla_policy()
                outputs, residuals, route = self.dispatch.forward(
                    gate.handle(),
                    *stopped_args,
                    warmup_calls=policy["warmup_calls"],
                    max_shapes=policy["max_shapes"],
                    min_elements=policy["min_elements"],
                    **stopped_kwargs,
                )
            outputs = _with_static_shape(outputs, args[0])

            def grad(*upstream, variables=None):
                grads = self._gradients(
                    args, kwargs, positions, sources, residuals, upstream, route
                )
                if variables:
                    return grads, [None] * len(variables)
                return grads

            return outputs, grad

        return run(*sources)

    def _gradients(self, args, kwargs, positions, sources, residuals, upstream, route):
        """The backward program's gradients; exactly differentiable when recorded.

        `upstream` has None for outputs without a gradient. Recorded means that
        a gradient tape (or a forward accumulator started after the forward
        pass) watches the sources or the upstream gradients.
        """
        # Only the normalized output carries a gradient (the statistics the
        # kernels return are under stop_gradient); a tape passes zeros for the
        # others, which must not become inputs of the backward program.
        present = tuple(i for i in GRADIENT_OUTPUTS if upstream[i] is not None)
        given = [upstream[i] for i in present]
        if not present:
            return [tf.zeros_like(source) for source in sources]
        if not tf_internals.gradient_possibly_watched(list(sources) + given):
            inputs = (args, kwargs, residuals, given, positions, present)
            if tf.is_tensor(route):
                return list(self.dispatch.backward(route, *inputs))
            return list(route.backward(*inputs))
        return _autodiff_gradients(self.fn, args, kwargs, positions, sources, upstream)

    def experimental_get_tracing_count(self):
        """Traces so far of the forward and backward programs, XLA and plain, all ranks."""
        return (
            self.xla.experimental_get_tracing_count()
            + self.plain.experimental_get_tracing_count()
            + self.nested.experimental_get_tracing_count()
            + self.dispatch.experimental_get_tracing_count()
            + self.eager.experimental_get_tracing_count()
        )


def kernel(fn=None, *, per_layer_ints=(), inline_when=None):
    """Decorator: make `fn` a `Kernel`.

    `per_layer_ints`: names of int keyword arguments that differ between the
    layers of one model but not in the ops they make (a group count): the
    programs take them as tensors, so one trace serves every value.
    `inline_when`: None, or a predicate called with a training call's
    arguments (input shape known while tracing): True runs that call inline
    as for a small input, whatever its size, instead of the XLA programs.
    """
    if fn is None:
        return lambda fn: Kernel(fn, per_layer_ints, inline_when)
    return Kernel(fn, per_layer_ints, inline_when)
