"""`explain`: the route a layer's call takes and why, for a bug report."""

import dataclasses

import tensorflow as tf

from kerasbn.kernels import engine, policy, routing


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One kernel call of the explained layer call."""

    kernel: str
    route: routing.Route
    reason: str
    facts: routing.CallFacts


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What `explain` found: the context, and each kernel call's route and reason; `str()` of it
    is a text to paste into a bug report."""

    context: str
    calls: tuple

    @property
    def routes(self):
        """The route names, one per kernel call, in call order."""
        return tuple(call.route.name for call in self.calls)

    def __str__(self):
        settings = ", ".join(f"{name}={value!r}" for name, value in policy.get_xla_policy().items())
        lines = [f"TensorFlow {tf.__version__}; policy {settings}", self.context]
        if not self.calls:
            lines.append("  no kerasbn kernel is called")
        for call in self.calls:
            route = f"{call.route.name}, {call.route.description}"
            lines.append(f"  kernel {call.kernel} on {call.facts.platform}: route {route}")
            lines.append(f"    because {call.reason}")
        return "\n".join(lines)


def explain(layer, inputs, training=True, jit_compile=False):
    """The route each kernel call of `layer(inputs, training=training)` takes, and why: an
    `Explanation`, whose `str()` names the versions, the policy, the platform and, per kernel call,
    the route and the reason.

    `layer`: a built or unbuilt kerasbn layer (or any Keras layer; one calling no kerasbn kernel is
    explained as such). `inputs`: a tensor or array, whose shape (batch size included) and dtype
    are the call's. The call is traced, never run (weights and moving statistics are left as they
    are), as in Keras' `fit` (`training`, bool, default True: a step under a `tf.GradientTape`) or
    `predict` (no tape), XLA-compiled if `jit_compile` (bool, default False; as
    `model.compile(jit_compile=True)`), under the XLA policy in force in this thread. `TypeError`
    if `training` or `jit_compile` is not a bool.
    """
    for name, value in (("training", training), ("jit_compile", jit_compile)):
        if not isinstance(value, bool):
            raise TypeError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")
    inputs = tf.convert_to_tensor(inputs)
    spec = tf.TensorSpec(inputs.shape, inputs.dtype)

    calls = []

    def step(x):
        calls.clear()  # a trace that creates the layer's weights is traced again
        if not training:
            return layer(x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    # The engine tells this thread's observers each kernel call's (kernel, route, reason, facts).
    active = getattr(engine._observers, "active", ())
    engine._observers.active = active + (lambda *call: calls.append(KernelCall(*call)),)
    try:
        tf.function(step, jit_compile=jit_compile, autograph=False).get_concrete_function(spec)
    finally:
        engine._observers.active = active
    where = "an XLA-compiled" if jit_compile else "a traced"
    mode = f"training step under a GradientTape, in {where} function" if training else (
        f"inference call (training=False), in {where} function, no tape"
    )
    context = (
        f"layer {getattr(layer, 'name', '?')!r} ({type(layer).__name__}), input "
        f"{inputs.dtype.name} {tuple(inputs.shape)}: {mode}"
    )
    return Explanation(context, tuple(calls))
