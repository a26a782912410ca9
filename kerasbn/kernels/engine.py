"""Running a kernel call on the route `routing.choose_route` picks.

A kernel is a pure function of tensors and Python options that takes a `Build` (`build.py`).
`Kernel` gathers the facts of a call while the caller is traced, asks `choose_route`, makes the
`Build` that route needs and runs it; it decides nothing else. The routes that record a gradient
wrap the call in a `tf.custom_gradient` at the caller's level, so the tape records nothing inside
the kernel, and every route's backward has one signature (`Kernel._taped`):

- programs (XLA or plain `tf.function`s, traced once per signature with every dimension unknown):
  the forward returns the kernel's outputs and the statistics it marked with `Build.residual`;
  the backward re-traces the kernel with them fed back in and takes its symbolic gradient, so `x`
  is taken from the caller, never returned by a program (an XLA program cannot return its own
  parameter without copying it: docs/decisions/013-forward-backward-two-programs.md);
- inline ops: the kernel runs under a tape of its own in the caller's graph, and the backward
  asks that tape (the kernel is traced once, not twice).

A gradient that is itself recorded (a gradient penalty, a Hessian-vector product) is
TensorFlow's autodiff of the kernel built with `Build.differentiable`, exact to any order.
"""

import dataclasses
import functools
import numbers
import threading

import tensorflow as tf

from kerasbn.kernels import policy as policies
from kerasbn.kernels import routing, tf_internals, warmup
from kerasbn.kernels.build import Build, Residuals
from kerasbn.kernels.synchronized import SECOND_ORDER_SYNCHRONIZED

# Which of a kernel's flattened outputs carry a gradient: the normalized tensor, which every
# kernel returns first; the rest are statistics.
GRADIENT_OUTPUTS = (0,)

# Where `explain` collects the routes of the calls it traces (this thread only).
_observers = threading.local()


@dataclasses.dataclass(frozen=True)
class FusedForm:
    """TensorFlow's fused op standing in for a kernel: `role` ("training" or "inference"),
    `accepts(*args, **kwargs)` whether it can compute a call, and `run(*args, **kwargs)` (the
    kernel's arguments without `build`), which returns the kernel's output structure."""

    role: str
    accepts: object
    run: object


def _differentiable(value):
    return tf.is_tensor(value) and value.dtype.is_floating


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
    leaves = tuple((v.dtype.name, v.shape.rank) if tf.is_tensor(v) else ("static", repr(v)) for v in flat)
    return repr(structure), leaves


def _with_sources(args, kwargs, positions, sources):
    """`(args, kwargs)` with the differentiable leaves at `positions` replaced."""
    flat = tf.nest.flatten((args, kwargs))
    for position, source in zip(positions, sources):
        flat[position] = source
    return tf.nest.pack_sequence_as((args, kwargs), flat)


def _function(fn, jit_compile):
    """`fn` as a never-inlined `tf.function` (`autograph=False`: kernels branch on Python values only)."""
    attributes = {"_noinline": True}
    return tf.function(fn, jit_compile=jit_compile, autograph=False, experimental_attributes=attributes)


class _Program:
    """A plain `tf.function` traced once per signature, with every dimension unknown.

    One trace serves every layer of a model and every batch size (XLA still compiles per concrete
    shape), which keeps a model's first step short (docs/decisions/018-trace-kernels-once.md).
    """

    def __init__(self, fn):
        self.function = _function(fn, jit_compile=False)
        self._traces = {}

    def __call__(self, *args, **kwargs):
        key = _signature_key(args, kwargs)
        if key not in self._traces:
            specs, kw_specs = tf.nest.map_structure(_relaxed, (args, kwargs))
            self._traces[key] = self.function.get_concrete_function(*specs, **kw_specs)
        return self._traces[key](*args, **kwargs)


def _forward(fn, build):
    """`fn` returning its outputs and the residuals it recorded (`Build.residual`)."""

    def forward(*args, **kwargs):
        residuals = Residuals()
        outputs = fn(*args, build=build.replace(residuals=residuals), **kwargs)
        return outputs, list(residuals.recorded)

    forward.__name__ = f"forward_{fn.__name__}"
    return forward


def _backward(fn, build):
    """The gradients of the flattened arguments at `positions`, given those of the outputs at
    `upstream_positions` (the others have none: zeros fed in would be constants, which make
    grappler copy the program per call site), with the forward's residuals fed back in."""

    def backward(args, kwargs, residuals, upstream, positions, upstream_positions):
        flat = tf.nest.flatten((args, kwargs))
        outputs = fn(*args, build=build.replace(residuals=Residuals(residuals)), **kwargs)
        outputs = [tf.nest.flatten(outputs)[i] for i in upstream_positions]
        # Symbolic gradients, not a tape: a tape records nothing when this is
        # first traced while taping is paused (inside a ForwardAccumulator).
        return tf.gradients(
            outputs, [flat[i] for i in positions], grad_ys=upstream,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    backward.__name__ = f"backward_{fn.__name__}"
    return backward


def _dispatch(fn, xla_build, plain_build):
    """Route `warmup_dispatch`'s forward and backward programs: they count a training call
    (`warmup.decide`) and run the kernel's XLA or plain forward by a `tf.cond`, returning the
    decision with the residuals for the backward. One function call in the caller's graph per
    layer call; the XLA functions are called with the dispatch's relaxed arguments, so they are
    traced once per signature too."""
    xla_forward = _function(_forward(fn, xla_build), jit_compile=True)
    xla_backward = _function(_backward(fn, xla_build), jit_compile=True)
    plain_forward, plain_backward = _forward(fn, plain_build), _backward(fn, plain_build)

    def forward(handle, *args, warmup_calls, max_shapes, min_elements, **kwargs):
        compiled = warmup.decide(handle, args[0], warmup_calls, max_shapes, min_elements)
        outputs, residuals = tf.cond(
            compiled,
            functools.partial(xla_forward, *args, **kwargs),
            functools.partial(plain_forward, *args, **kwargs),
        )
        return outputs, (residuals, compiled)

    def backward(args, kwargs, saved, *gradient_of):
        residuals, compiled = saved
        return tf.cond(
            compiled,
            functools.partial(xla_backward, args, kwargs, residuals, *gradient_of),
            functools.partial(plain_backward, args, kwargs, residuals, *gradient_of),
        )

    forward.__name__ = f"dispatch_forward_{fn.__name__}"
    backward.__name__ = f"dispatch_backward_{fn.__name__}"
    return _Program(forward), _Program(backward), (xla_forward, xla_backward)


def _inline_forward(run):
    """`run` under a tape of its own, kept with the inputs and outputs for `_tape_backward`."""

    def forward(*args, **kwargs):
        inputs = tf.nest.flatten((args, kwargs))
        # Persistent: a persistent outer tape may ask for the gradient twice.
        tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        with tape:
            tape.watch([value for value in inputs if _differentiable(value)])
            outputs = run(*args, **kwargs)
        return outputs, (tape, inputs, tf.nest.flatten(outputs))

    return forward


def _tape_backward(args, kwargs, saved, upstream, positions, upstream_positions):
    """Route `inline_ops`' backward: the forward's own tape asked for the gradients."""
    del args, kwargs  # the tape holds them
    tape, inputs, outputs = saved
    return tape.gradient(
        [outputs[i] for i in upstream_positions], [inputs[i] for i in positions],
        output_gradients=list(upstream), unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )


def _platform(policy):
    if policy.platform is not None:
        return policy.platform
    return "cpu-onednn" if tf_internals.onednn_enabled() is True else "cpu"


def build_for(route, facts):
    """The `Build` a route runs the kernel with (the XLA programs of `warmup_dispatch` make their
    own: `Kernel._dispatched`). Block sums are a layout for XLA's CPU backend only."""
    in_xla, block_sums = facts.in_xla_caller, facts.platform != "gpu"
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

    `kernel(*args, jit_compile=True, shape_use=None, **kwargs)`: `jit_compile` is the layer's flag
    and `shape_use` its `warmup.ShapeUse` (None shares one per configuration).
    """

    def __init__(self, fn, per_layer_ints=(), fused=None, check=None):
        self.fn, self.fused, self._per_layer_ints = fn, fused, tuple(per_layer_ints)
        self._check = check
        self._programs, self._dispatch, self._shape_use = {}, {}, {}
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def route(self, args, kwargs, jit_compile=True):
        """`(route, reason, facts, (args, kwargs, positions))` of a call, without running it."""
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
        positions = tuple(i for i in differentiable if tf_internals.gradient_recorded([flat[i]]))
        x, policy = args[0], policies.current()
        fused = self.fused is not None and self.fused.accepts(*args, **kwargs)
        facts = routing.CallFacts(
            eager=tf.executing_eagerly(),
            in_xla_caller=tf_internals.in_xla_context(),
            forward_accumulator=accumulator,
            gradient_recorded=bool(positions),
            static_elements=x.shape.num_elements() if x.shape.is_fully_defined() else None,
            strategy=tf.distribute.has_strategy(),
            collective=kwargs.get("all_reduce") is not None,
            fused_op=self.fused.role if fused else None,
            jit_compile=jit_compile,
            policy=policy,
            platform=_platform(policy),
        )
        route, reason = routing.choose_route(facts)
        return route, reason, facts, (args, kwargs, positions)

    @tf.autograph.experimental.do_not_convert
    def __call__(self, *args, jit_compile=True, shape_use=None, **kwargs):
        if self._check is not None:  # while the per-layer ints are Python ints, on every route
            self._check(*args, **kwargs)
        route, reason, facts, (args, kwargs, positions) = self.route(args, kwargs, jit_compile)
        for observer in getattr(_observers, "active", ()):
            observer(self.__name__, route, reason, facts)
        build = build_for(route, facts)
        if route is routing.FUSED_OP and not facts.gradient_recorded:
            return self.fused.run(*args, **kwargs)
        if route is routing.EAGER_PROGRAM:
            return self._program(build, eager=True)(*args, **self._for_programs(kwargs))
        if not route.taped:
            return self.fn(*args, build=build, **kwargs)
        if route is routing.FUSED_OP:
            forward, backward = _inline_forward(self.fused.run), _tape_backward
        elif route is routing.INLINE_OPS:
            forward, backward = _inline_forward(functools.partial(self.fn, build=build)), _tape_backward
        elif route is routing.WARMUP_DISPATCH:
            kwargs = self._for_programs(kwargs)
            forward, backward = self._dispatched(facts, shape_use or self._shape_use_for(args, kwargs))
        else:  # plain programs, traced into an XLA caller's program on `xla_caller_programs`
            kwargs = kwargs if route is routing.XLA_CALLER_PROGRAMS else self._for_programs(kwargs)
            forward, backward = self._program(build), self._program(build, backward=True)
        # All-reduced statistics have no exact second order: a recorded gradient is refused.
        run = self._taped(args, kwargs, positions, build, forward, backward, exact=not facts.collective)
        return run(*[tf.nest.flatten((args, kwargs))[i] for i in positions])

    def _taped(self, args, kwargs, positions, build, forward, backward, exact):
        """The call as a `tf.custom_gradient` of its sources: `forward(*args, **kwargs)` on
        gradient-stopped inputs returns `(outputs, saved)`; `backward(args, kwargs, saved,
        upstream, positions, upstream_positions)` the gradients. A recorded gradient is the
        autodiff of the differentiable kernel (`exact`), else refused."""

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
                        raise NotImplementedError(SECOND_ORDER_SYNCHRONIZED)
                    grads = self._autodiff(args, kwargs, positions, sources, upstream, build)
                else:
                    given = [upstream[i] for i in present]
                    grads = list(backward(args, kwargs, saved, given, positions, present))
                return (grads, [None] * len(variables)) if variables else grads

            return outputs, grad

        return run

    def _autodiff(self, args, kwargs, positions, sources, upstream, build):
        """The kernel's vector-Jacobian product by TensorFlow's autodiff of its differentiable
        build, as recordable ops (a gradient of a gradient)."""
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(sources)
            call_args, call_kwargs = _with_sources(args, kwargs, positions, sources)
            differentiable = build.replace(differentiable=True, residuals=None)
            outputs = self.fn(*call_args, build=differentiable, **call_kwargs)
        pairs = [(o, g) for o, g in zip(tf.nest.flatten(outputs), upstream) if g is not None]
        return tape.gradient(
            [o for o, _ in pairs], list(sources), output_gradients=[g for _, g in pairs],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )

    def _program(self, build, eager=False, backward=False):
        """The plain program of `build`: forward, backward, or (eager) the kernel forward only,
        one program call instead of a hundred eager ops. Traced on first use."""
        key = (build, eager, backward)
        if key not in self._programs:
            if eager:
                fn = self.fn
                program = _Program(lambda *args, **kwargs: fn(*args, build=build, **kwargs))
            else:
                program = _Program((_backward if backward else _forward)(self.fn, build))
            self._programs[key] = program
        return self._programs[key]

    def _dispatched(self, facts, shape_use):
        """`(forward, backward)` of route `warmup_dispatch` for this policy and platform."""
        policy = facts.policy
        key = (Build.of(policy, for_xla=True, block_sums=facts.platform != "gpu"), Build.of(policy))
        if key not in self._dispatch:
            self._dispatch[key] = _dispatch(self.fn, *key)
        forward, backward, _ = self._dispatch[key]
        counts = dict(warmup_calls=policy.warmup_calls, max_shapes=policy.max_shapes)
        counts.update(min_elements=policy.min_elements)
        return functools.partial(forward, shape_use.handle(), **counts), backward

    def _shape_use_for(self, args, kwargs):
        key = _signature_key(args, kwargs)
        if key not in self._shape_use:
            description = f"kernel {self.__name__} (configuration {len(self._shape_use)})"
            self._shape_use[key] = warmup.ShapeUse(description)
        return self._shape_use[key]

    def _for_programs(self, kwargs):
        """`kwargs` with the per-layer ints as `PlaceholderWithDefault` tensors: one trace and one
        optimized program for every value (as Python ints, one trace per value; as constants,
        grappler copies the program per call site: docs/decisions/017-per-layer-ints-as-placeholders.md)."""
        kwargs = dict(kwargs)
        for name in self._per_layer_ints:
            value = kwargs.get(name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                default = tf.constant(int(value), tf.int32)
                kwargs[name] = tf.raw_ops.PlaceholderWithDefault(input=default, shape=[])
        return kwargs

    def experimental_get_tracing_count(self):
        """Traces so far of every program of this kernel."""
        functions = [program.function for program in self._programs.values()]
        for forward, backward, xla in self._dispatch.values():
            functions += [forward.function, backward.function, *xla]
        return sum(function.experimental_get_tracing_count() for function in functions)


def kernel(fn=None, *, per_layer_ints=(), fused=None, check=None):
    """Decorator: make `fn` (which takes a keyword `build`) a `Kernel`.

    `per_layer_ints`: names of int keyword arguments that differ between the layers of one model
    but not in the ops they make (a group count). `fused`: a `FusedForm`, TensorFlow's op for the
    calls it accepts. `check`: None, or a callable taking the call's arguments that raises for a
    bad one, before the route is chosen (the per-layer ints are still Python ints there).
    """
    if fn is None:
        return lambda fn: Kernel(fn, per_layer_ints, fused, check)
    return Kernel(fn, per_layer_ints, fused, check)
