"""Running a kernel call on the route `routing.choose_route` picks.

A kernel is a pure function of tensors and Python options that takes a
`Build` (`build.py`). `Kernel` gathers the facts of a call while the caller is
traced, asks `choose_route`, makes the `Build` that route needs and runs it;
it decides nothing else. The routes that record a gradient wrap the call in
a `tf.custom_gradient` at the caller's level, so the tape records nothing
inside the kernel:

- programs (XLA or plain `tf.function`s, traced once per signature with
  every dimension unknown): the forward returns the kernel's outputs and the
  statistics it marked with `Build.residual`; the backward re-traces the
  kernel with them fed back in and takes its symbolic gradient, so `x` is
  taken from the caller, never returned by a program (an XLA program cannot
  return its own parameter without copying it:
  docs/decisions/013-forward-backward-two-programs.md);
- inline ops: the kernel runs under a tape of its own in the caller's graph,
  and the backward asks that tape (the kernel is traced once, not twice).

A gradient that is itself recorded (a gradient penalty, a Hessian-vector
product) is TensorFlow's autodiff of the kernel built with
`Build.differentiable`, exact to any order.
"""

import dataclasses
import functools
import numbers
import threading

import tensorflow as tf

from kerasbn.kernels import policy as policies
from kerasbn.kernels import routing, tf_internals, warmup
from kerasbn.kernels.build import Build, Residuals

# Which of a kernel's flattened outputs carry a gradient: the normalized
# tensor, which every kernel returns first; the rest are statistics.
GRADIENT_OUTPUTS = (0,)

# Where `explain` collects the routes of the calls it traces (this thread only).
_observers = threading.local()


@dataclasses.dataclass(frozen=True)
class FusedForm:
    """TensorFlow's fused op standing in for a kernel: `role` ("training" or
    "inference"), `accepts(*args, **kwargs)` whether it can compute a call,
    and `run(*args, **kwargs)` (the kernel's arguments without `build`),
    which returns the kernel's output structure."""

    role: str
    accepts: object
    run: object


def _differentiable(value):
    return tf.is_tensor(value) and value.dtype.is_floating


def _sources(args, kwargs, positions):
    """The differentiable leaves at `positions` of the flattened arguments."""
    flat = tf.nest.flatten((args, kwargs))
    return [flat[i] for i in positions]


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


def _with_sources(args, kwargs, positions, sources):
    """`(args, kwargs)` with the differentiable leaves at `positions` replaced."""
    flat = tf.nest.flatten((args, kwargs))
    for position, source in zip(positions, sources):
        flat[position] = source
    return tf.nest.pack_sequence_as((args, kwargs), flat)


class _Program:
    """A `tf.function` traced once per signature, with every dimension unknown.

    One trace serves every layer of a model and every batch size (XLA still
    compiles per concrete shape), which keeps a model's first step short.
    `autograph=False`: the kernels branch only on Python values.
    """

    def __init__(self, fn, jit_compile):
        self._function = tf.function(
            fn, jit_compile=jit_compile, autograph=False, experimental_attributes={"_noinline": True}
        )
        self._traces = {}

    def __call__(self, *args, **kwargs):
        key = _signature_key(args, kwargs)
        if key not in self._traces:
            specs, kw_specs = tf.nest.map_structure(_relaxed, (args, kwargs))
            self._traces[key] = self._function.get_concrete_function(*specs, **kw_specs)
        return self._traces[key](*args, **kwargs)

    def experimental_get_tracing_count(self):
        return self._function.experimental_get_tracing_count()


def _forward(fn, build):
    def forward(*args, **kwargs):
        residuals = Residuals()
        outputs = fn(*args, build=build.replace(residuals=residuals), **kwargs)
        return outputs, list(residuals.recorded)

    forward.__name__ = f"forward_{fn.__name__}"
    return forward


def _backward(fn, build):
    def backward(args, kwargs, residuals, upstream, positions, upstream_positions):
        """Gradients of the flattened arguments at `positions`, given those of
        the outputs at `upstream_positions` (the others have none: zeros fed
        in would be constants, which make grappler copy the program per call site)."""
        flat = tf.nest.flatten((args, kwargs))
        outputs = fn(*args, build=build.replace(residuals=Residuals(residuals)), **kwargs)
        outputs = [tf.nest.flatten(outputs)[i] for i in upstream_positions]
        # Symbolic gradients, not a tape: a tape records nothing when this is
        # first traced while taping is paused (inside a ForwardAccumulator).
        return tf.gradients(
            outputs,
            [flat[i] for i in positions],
            grad_ys=upstream,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    backward.__name__ = f"backward_{fn.__name__}"
    return backward


class _Programs:
    """A kernel's forward and backward programs for one `Build`, XLA-compiled or not."""

    def __init__(self, fn, build, jit_compile):
        self.forward = _Program(_forward(fn, build), jit_compile)
        self.backward = _Program(_backward(fn, build), jit_compile)

    def pair(self):
        """`(forward, backward)` as `Kernel._taped` calls them."""
        def backward(inputs, residuals):
            return self.backward(*inputs[:2], residuals, *inputs[2:])

        return self.forward, backward

    def experimental_get_tracing_count(self):
        return sum(p.experimental_get_tracing_count() for p in (self.forward, self.backward))


class _Dispatch:
    """Plain programs that count a training call (`warmup.decide`) and run the
    XLA or the plain programs by a `tf.cond`; the forward returns its decision
    with the residuals, for the backward. One function call in the caller's
    graph per layer call."""

    def __init__(self, fn, xla, plain_build):
        plain_forward, plain_backward = _forward(fn, plain_build), _backward(fn, plain_build)

        def forward(handle, *args, warmup_calls, max_shapes, min_elements, **kwargs):
            compiled = warmup.decide(handle, args[0], warmup_calls, max_shapes, min_elements)
            outputs, residuals = tf.cond(
                compiled,
                functools.partial(xla.forward, *args, **kwargs),
                functools.partial(plain_forward, *args, **kwargs),
            )
            return outputs, (residuals, compiled)

        def backward(compiled, *args):
            return tf.cond(compiled, lambda: xla.backward(*args), lambda: plain_backward(*args))

        forward.__name__ = f"dispatch_forward_{fn.__name__}"
        backward.__name__ = f"dispatch_backward_{fn.__name__}"
        self.forward = _Program(forward, jit_compile=False)
        self.backward = _Program(backward, jit_compile=False)

    def experimental_get_tracing_count(self):
        return sum(p.experimental_get_tracing_count() for p in (self.forward, self.backward))


class _Taped:
    """What inline ops keep for their backward: the tape, its inputs and outputs."""

    def __init__(self, tape, inputs, outputs):
        self.tape, self.inputs, self.outputs = tape, inputs, outputs

    def gradients(self, upstream, positions, upstream_positions):
        return self.tape.gradient(
            [self.outputs[i] for i in upstream_positions],
            [self.inputs[i] for i in positions],
            output_gradients=list(upstream),
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )


def _platform(policy):
    if policy.platform is not None:
        return policy.platform
    return "cpu-onednn" if tf_internals.onednn_enabled() is True else "cpu"


def _inline_forward(run):
    """`run` under a tape of its own, which the backward asks (`_Taped`)."""

    def forward(*args, **kwargs):
        inputs = tf.nest.flatten((args, kwargs))
        # Persistent: a persistent outer tape may ask for the gradient twice.
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        with tape:
            tape.watch([value for value in inputs if _differentiable(value)])
            outputs = run(*args, **kwargs)
        return outputs, _Taped(tape, inputs, tf.nest.flatten(outputs))

    return forward


def build_for(route, facts):
    """The `Build` a route runs the kernel with (the XLA programs of
    `warmup_dispatch` make their own: `Kernel._dispatcher`)."""
    in_xla = facts.in_xla_caller
    block_sums = facts.platform != "gpu"  # a layout for XLA's CPU backend only
    flags = {
        routing.FORWARD_MODE: dict(for_xla=in_xla, block_sums=in_xla and block_sums, differentiable=True),
        routing.GRAPH_OPS: dict(differentiable=True),
        routing.XLA_CALLER_OPS: dict(for_xla=True, block_sums=block_sums),
        routing.XLA_CALLER_PROGRAMS: dict(for_xla=True, block_sums=block_sums),
        routing.INLINE_OPS: dict(for_xla=in_xla, block_sums=in_xla and block_sums),
    }.get(route, {})
    return Build.of(facts.policy, **flags)


class Kernel:
    """A pure kernel function, called on the route `routing.choose_route` picks.

    `kernel(*args, jit_compile=True, shape_use=None, **kwargs)`: `jit_compile`
    is the layer's flag and `shape_use` its `warmup.ShapeUse` (None shares one
    per configuration).
    """

    def __init__(self, fn, per_layer_ints=(), fused=None):
        self.fn = fn
        self.fused = fused
        self._per_layer_ints = tuple(per_layer_ints)
        self._programs = {}
        self._dispatch = {}
        self._shape_use = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    # -- facts and route -------------------------------------------------------

    def route(self, args, kwargs, jit_compile=True):
        """`(route, reason, facts, positions)` of a call, without running it."""
        args, kwargs = tf.nest.map_structure(
            lambda v: tf.convert_to_tensor(v) if isinstance(v, tf.Variable) else v, (args, kwargs)
        )
        flat = tf.nest.flatten((args, kwargs))
        differentiable = [i for i, value in enumerate(flat) if _differentiable(value)]
        accumulator = bool(differentiable) and tf_internals.forward_accumulator_watches(
            [flat[i] for i in differentiable]
        )
        # The sources of the gradient: what a tape records (the input, the
        # trainable weights), not the moving statistics.
        positions = tuple(
            i for i in differentiable if tf_internals.gradient_recorded([flat[i]], unknown=True)
        )
        x = args[0]
        policy = policies.current()
        fused = None
        if self.fused is not None and self.fused.accepts(*args, **kwargs):
            fused = self.fused.role
        facts = routing.CallFacts(
            eager=tf.executing_eagerly(),
            in_xla_caller=tf_internals.in_xla_context(),
            forward_accumulator=accumulator,
            gradient_recorded=bool(positions),
            static_elements=x.shape.num_elements() if x.shape.is_fully_defined() else None,
            strategy=tf.distribute.has_strategy(),
            collective=kwargs.get("all_reduce") is not None,
            fused_op=fused,
            jit_compile=jit_compile,
            policy=policy,
            platform=_platform(policy),
        )
        route, reason = routing.choose_route(facts)
        return route, reason, facts, (args, kwargs, positions)

    # -- running ---------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def __call__(self, *args, jit_compile=True, shape_use=None, **kwargs):
        route, reason, facts, (args, kwargs, positions) = self.route(args, kwargs, jit_compile)
        for observer in getattr(_observers, "active", ()):
            observer(self.__name__, route, reason, facts)
        build = build_for(route, facts)
        if route is routing.FUSED_OP and not facts.gradient_recorded:
            return self.fused.run(*args, **kwargs)
        if route is routing.EAGER_PROGRAM:
            return self._programs_for(build, False, eager=True)(*args, **self._for_programs(kwargs))
        if not route.taped:
            return self.fn(*args, build=build, **kwargs)
        sources = _sources(args, kwargs, positions)
        if route in (routing.INLINE_OPS, routing.FUSED_OP):
            run = self.fused.run if route is routing.FUSED_OP else functools.partial(self.fn, build=build)
            forward, backward = _inline_forward(run), None
        else:
            if route is not routing.XLA_CALLER_PROGRAMS:
                kwargs = self._for_programs(kwargs)
            if route is routing.WARMUP_DISPATCH:
                forward, backward = self._dispatched(facts, shape_use or self._shape_use_for(args, kwargs))
            else:
                forward, backward = self._programs_for(build, jit_compile=False).pair()
        # All-reduced statistics have no exact second order: a recorded
        # gradient of such a call is refused.
        exact = not facts.collective
        return self._taped(args, kwargs, positions, build, forward, backward, exact)(*sources)

    def _taped(self, args, kwargs, positions, build, forward, backward, exact=True):
        """The call as a `tf.custom_gradient` of its sources: `forward(*args, **kwargs)` on
        gradient-stopped inputs returns `(outputs, saved)`; `backward((args,
        kwargs, upstream, positions, upstream_positions), saved)` the gradients
        (None: `saved` is inline ops' `_Taped`). A recorded gradient is the
        autodiff of the differentiable kernel (`exact`), or the route's own."""

        @tf.custom_gradient
        def run(*sources):
            stopped = _with_sources(args, kwargs, positions, [tf.stop_gradient(s) for s in sources])
            outputs, saved = forward(*stopped[0], **stopped[1])
            first = tf.nest.flatten(outputs)[0]
            if first.shape.rank == args[0].shape.rank:  # programs lose the static shape
                first.set_shape(args[0].shape)

            def grad(*upstream, variables=None):
                present = tuple(i for i in GRADIENT_OUTPUTS if upstream[i] is not None)
                if not present:
                    grads = [tf.zeros_like(source) for source in sources]
                elif tf_internals.gradient_possibly_watched(list(sources) + [upstream[i] for i in present]):
                    if not exact:
                        raise NotImplementedError(
                            "A gradient of a gradient (gradient penalty, Hessian-vector product) "
                            "through a layer with synchronized=True is not supported: its "
                            "hand-derived gradient treats the global batch statistics as constants. "
                            "Use synchronized=False for such models."
                        )
                    grads = self._autodiff(args, kwargs, positions, sources, upstream, build)
                else:
                    given = [upstream[i] for i in present]
                    if backward is None:
                        grads = saved.gradients(given, positions, present)
                    else:
                        grads = backward((args, kwargs, given, positions, present), saved)
                    grads = list(grads)
                return (grads, [None] * len(variables)) if variables else grads

            return outputs, grad

        return run

    def _autodiff(self, args, kwargs, positions, sources, upstream, build):
        """The kernel's vector-Jacobian product by TensorFlow's autodiff of its
        differentiable build, as recordable ops (a gradient of a gradient)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(sources)
            call_args, call_kwargs = _with_sources(args, kwargs, positions, sources)
            differentiable = build.replace(differentiable=True, residuals=None)
            outputs = self.fn(*call_args, build=differentiable, **call_kwargs)
        pairs = [(o, g) for o, g in zip(tf.nest.flatten(outputs), upstream) if g is not None]
        return tape.gradient(
            [o for o, _ in pairs],
            list(sources),
            output_gradients=[g for _, g in pairs],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    # -- programs, traced on first use -------------------------------------------

    def _programs_for(self, build, jit_compile, eager=False):
        key = (build, jit_compile, eager)
        if key not in self._programs:
            if eager:  # forward only: one program call instead of a hundred eager ops
                fn = self.fn
                self._programs[key] = _Program(lambda *a, **k: fn(*a, build=build, **k), jit_compile)
            else:
                self._programs[key] = _Programs(self.fn, build, jit_compile)
        return self._programs[key]

    def _dispatched(self, facts, shape_use):
        """`(forward, backward)` of route `warmup_dispatch` for this policy and platform."""
        policy = facts.policy
        key = (policy.block, policy.two_input_block, policy.group_matmul_limit, facts.platform)
        if key not in self._dispatch:
            xla_build = Build.of(policy, for_xla=True, block_sums=facts.platform != "gpu")
            xla = self._programs_for(xla_build, jit_compile=True)
            self._dispatch[key] = _Dispatch(self.fn, xla, Build.of(policy))
        dispatch = self._dispatch[key]
        counts = dict(warmup_calls=policy.warmup_calls, max_shapes=policy.max_shapes)
        forward = functools.partial(
            dispatch.forward, shape_use.handle(), min_elements=policy.min_elements, **counts
        )

        def backward(inputs, saved):
            residuals, compiled = saved
            return dispatch.backward(compiled, *inputs[:2], residuals, *inputs[2:])

        return forward, backward

    def _shape_use_for(self, args, kwargs):
        key = _signature_key(args, kwargs)
        if key not in self._shape_use:
            description = f"kernel {self.__name__} (configuration {len(self._shape_use)})"
            self._shape_use[key] = warmup.ShapeUse(description)
        return self._shape_use[key]

    def _for_programs(self, kwargs):
        """`kwargs` with the per-layer ints as `PlaceholderWithDefault` tensors:
        one trace and one optimized program for every value (as Python ints,
        one trace per value; as constants, grappler copies the program per
        call site: docs/decisions/017-per-layer-ints-as-placeholders.md)."""
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

    def experimental_get_tracing_count(self):
        """Traces so far of every program of this kernel."""
        programs = list(self._programs.values()) + list(self._dispatch.values())
        return sum(p.experimental_get_tracing_count() for p in programs)


def kernel(fn=None, *, per_layer_ints=(), fused=None):
    """Decorator: make `fn` (which takes a keyword `build`) a `Kernel`.

    `per_layer_ints`: names of int keyword arguments that differ between the
    layers of one model but not in the ops they make (a group count).
    `fused`: a `FusedForm`, TensorFlow's op for the calls it accepts.
    """
    if fn is None:
        return lambda fn: Kernel(fn, per_layer_ints, fused)
    return Kernel(fn, per_layer_ints, fused)
