"""How a kernel call runs: the facts of the call, the routes, and the one function choosing.

`choose_route(facts)` is the only place that decides; it is pure (facts in, route and reason out)
and reads top to bottom as the route table of docs/layout.md. `engine.Kernel` gathers the facts
while the caller is traced, runs the route it returns, and decides nothing else.
"""

import dataclasses

from kerasbn.kernels.policy import Policy


@dataclasses.dataclass(frozen=True)
class Route:
    """A way to run a kernel call.

    Attributes:
      name: the identifier used in the route table and by `explain`.
      taped: whether the call records a gradient (forward and backward built
        by the route) or runs forward only.
      description: what runs, in a sentence.
    """

    name: str
    taped: bool
    description: str


FORWARD_MODE = Route(
    "forward_mode", False,
    "the kernel's ops inline as plain differentiable TensorFlow ops (exact to any order)",
)
EAGER_PROGRAM = Route("eager_program", False, "one plain (non-XLA) program call, forward only")
XLA_CALLER_OPS = Route(
    "xla_caller_ops", False,
    "the kernel's ops inline, compiled by the caller's XLA program with the rest of the step",
)
GRAPH_OPS = Route(
    "graph_ops", False,
    "the kernel's ops inline as plain differentiable ops, for TensorFlow's graph optimizer",
)
FUSED_OP = Route(
    "fused_op", True,
    "TensorFlow's FusedBatchNormV3 op inline (oneDNN or cuDNN kernel), with TensorFlow's gradient",
)
XLA_CALLER_PROGRAMS = Route(
    "xla_caller_programs", True, "forward and backward programs traced into the caller's XLA program"
)
INLINE_OPS = Route(
    "inline_ops", True, "the kernel's ops inline with the hand-derived gradient, no program call"
)
PLAIN_PROGRAMS = Route("plain_programs", True, "forward and backward plain (non-XLA) programs")
WARMUP_DISPATCH = Route(
    "warmup_dispatch", True,
    "forward and backward programs chosen per call at run time: plain while the input "
    "shape is new, XLA once it recurs (Policy.warmup_calls, max_shapes)",
)
ROUTES = (
    FORWARD_MODE, EAGER_PROGRAM, XLA_CALLER_OPS, GRAPH_OPS, FUSED_OP,
    XLA_CALLER_PROGRAMS, INLINE_OPS, PLAIN_PROGRAMS, WARMUP_DISPATCH,
)


@dataclasses.dataclass(frozen=True)
class CallFacts:
    """What is known about a kernel call while its caller is traced.

    Attributes:
      eager: the call runs eagerly (no caller's graph).
      in_xla_caller: the caller is compiled by XLA (`tf.function(jit_compile=True)`).
      forward_accumulator: a `tf.autodiff.ForwardAccumulator` watches an input.
      gradient_recorded: a gradient tape records the call (a training step).
      static_elements: the input's element count when its shape is known
        while tracing, else None.
      strategy: the call is traced under a `tf.distribute` strategy.
      collective: the kernel all-reduces across replicas (synchronized
        statistics): its ops must stay in the caller's graph.
      fused_op: None, or "training" / "inference": TensorFlow's fused
        batch-norm op can compute this call (dtype, layout, no mask, epsilon).
      jit_compile: the layer's `jit_compile`.
      policy: the `Policy` in force.
      platform: "cpu", "cpu-onednn" or "gpu" (`Policy.platform` or detected).
    """

    eager: bool
    in_xla_caller: bool
    forward_accumulator: bool
    gradient_recorded: bool
    static_elements: int
    strategy: bool
    collective: bool
    fused_op: str
    jit_compile: bool
    policy: Policy
    platform: str


def choose_route(facts):
    """The route of a kernel call, and why, in words for a bug report."""
    if facts.forward_accumulator:
        return FORWARD_MODE, "a ForwardAccumulator watches the inputs"
    if not facts.gradient_recorded:
        if facts.eager and not facts.collective:
            return EAGER_PROGRAM, "no tape records the call and it runs eagerly"
        if facts.in_xla_caller:
            return XLA_CALLER_OPS, "no tape records the call and the caller is XLA-compiled"
        if facts.fused_op == "inference":
            return FUSED_OP, (
                "no tape records the call, in a graph run op by op: TensorFlow's fused op, "
                "which its graph optimizer folds into a preceding convolution"
            )
        return GRAPH_OPS, "no tape records the call, in a graph run op by op (or eagerly, all-reduced)"
    if facts.collective:
        return INLINE_OPS, "a tape records the call and its statistics are all-reduced across replicas"
    if facts.in_xla_caller:
        return XLA_CALLER_PROGRAMS, "a tape records the call and the caller is XLA-compiled"
    # Replicas' graphs are built side by side with different static shapes,
    # where TensorFlow's graph optimizer rewrote inline ghost-batch ops wrongly.
    graph = not facts.eager and not facts.strategy
    # oneDNN's kernel only: on a GPU, float32 NHWC training through cuDNN
    # transposes to NCHW and back (docs/decisions/022-gpu-route-untested.md).
    large = (facts.static_elements or 0) >= facts.policy.fused_min_elements
    if graph and facts.fused_op == "training" and facts.platform == "cpu-onednn" and large:
        return FUSED_OP, (
            f"a training step with oneDNN on a static float32 NHWC input of "
            f"{facts.static_elements} elements, at least Policy.fused_min_elements "
            f"{facts.policy.fused_min_elements}"
        )
    small = facts.static_elements is not None and facts.static_elements < facts.policy.min_elements
    if small and graph:
        return INLINE_OPS, (
            f"a training step on a static input of {facts.static_elements} elements, "
            f"under Policy.min_elements {facts.policy.min_elements}"
        )
    if small:
        return PLAIN_PROGRAMS, (
            f"a training step on {facts.static_elements} elements, under Policy.min_elements, "
            + ("run eagerly" if facts.eager else "under a distribution strategy")
        )
    if not facts.jit_compile:
        return PLAIN_PROGRAMS, "a training step of a layer built with jit_compile=False"
    if not facts.policy.jit:
        return PLAIN_PROGRAMS, "a training step inside kerasbn.kernels.jit_disabled()"
    size = "an input shape unknown while tracing" if facts.static_elements is None else (
        f"{facts.static_elements} elements, at least Policy.min_elements {facts.policy.min_elements}"
    )
    return WARMUP_DISPATCH, f"a training step on {size}"
