"""`explain`: the route a layer's call takes and why, for a bug report."""

import contextlib
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
    """What `explain` found: the context, and each kernel call's route and reason.

    `str(explanation)` is a text to paste into a bug report.
    """

    context: str
    calls: tuple

    @property
    def routes(self):
        """The route names, one per kernel call, in call order."""
        return tuple(call.route.name for call in self.calls)

    def __str__(self):
        settings = dataclasses.asdict(policy.current())
        lines = [
            f"TensorFlow {tf.__version__}; policy "
            + ", ".join(f"{name}={value!r}" for name, value in settings.items()),
            self.context,
        ]
        if not self.calls:
            lines.append("  no kerasbn kernel is called")
        for call in self.calls:
            lines += [
                f"  kernel {call.kernel} on {call.facts.platform}: route {call.route.name}, "
                f"{call.route.description}",
                f"    because {call.reason}",
            ]
        return "\n".join(lines)


@contextlib.contextmanager
def _observing(calls):
    def observe(kernel, route, reason, facts):
        calls.append(KernelCall(kernel, route, reason, facts))

    active = getattr(engine._observers, "active", ())
    engine._observers.active = active + (observe,)
    try:
        yield
    finally:
        engine._observers.active = active


def explain(layer, inputs, training=True, jit_compile=False):
    """The route each kernel call of `layer(inputs, training=training)` takes, and why.

    The call is traced as in Keras' `fit` (training: a traced step under a
    `tf.GradientTape`; `jit_compile=True`: the step XLA-compiled) or
    `predict` (not training: a traced call, no tape), with the XLA policy in
    force in this thread. Tracing runs nothing: weights and moving
    statistics are left as they are.

    Args:
      layer: a built or unbuilt kerasbn layer (or any Keras layer; one
        calling no kerasbn kernel is explained as such).
      inputs: a tensor or array: its shape (batch size included) and dtype
        are those of the explained call.
      training: bool, default True.
      jit_compile: bool, default False: whether the step is XLA-compiled
        (`model.compile(jit_compile=True)`).

    Returns:
      An `Explanation`; `str()` of it names the versions, the policy, the
      platform and, per kernel call, the route and the reason.

    Raises:
      TypeError: `training` or `jit_compile` is not a bool.
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

    with _observing(calls):
        tf.function(step, jit_compile=jit_compile, autograph=False).get_concrete_function(spec)
    where = "an XLA-compiled" if jit_compile else "a traced"
    mode = f"training step under a GradientTape, in {where} function" if training else (
        f"inference call (training=False), in {where} function, no tape"
    )
    context = (
        f"layer {getattr(layer, 'name', '?')!r} ({type(layer).__name__}), input "
        f"{inputs.dtype.name} {tuple(inputs.shape)}: {mode}"
    )
    return Explanation(context, tuple(calls))
