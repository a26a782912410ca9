"""What the math is built for: one immutable object the route passes down.

The same kernel function is built several ways, and the math needs to know which: summed in blocks
for XLA's CPU backend or with one `tf.reduce_sum`, with hand-derived gradients or as plain
differentiable ops, and whether the batch statistics are saved for a separate backward program. The
route that runs a call (`routing.py`) makes one `Build` and every math function takes it as an
argument; nothing is read from thread-local state.
"""

import dataclasses

from kerasbn.kernels.policy import DEFAULT


class Residuals:
    """Records (forward program) or replays (backward program) the statistics a kernel marks with
    `Build.residual`, so the backward does not recompute them."""

    def __init__(self, saved=None):
        self.saved = saved
        self.recorded = []

    def take(self, tensor):
        position = len(self.recorded)
        self.recorded.append(tensor)
        if self.saved is None:
            return tensor
        value = self.saved[position]
        if value.dtype != tensor.dtype or value.shape.rank != tensor.shape.rank:
            raise ValueError("residuals replayed out of order")
        return value


@dataclasses.dataclass(frozen=True)
class Build:
    """How a kernel's ops are built.

    Attributes:
      for_xla: XLA compiles the ops: a fused activation's backward recomputes
        its input inside the loops that read `x` anyway, and activation
        gradients are formulas. Otherwise (a graph run op by op) the
        activation's output or its input is kept and TensorFlow's gradient
        ops are used (`activations.kept_for_gradient`).
      block_sums: sums arranged for XLA's CPU backend (blocks, then a matrix
        product: `moments.sum_over`); False is one `tf.reduce_sum`.
      differentiable: the statistics keep their gradient and no custom
        gradient is used: TensorFlow's autodiff is exact to any order
        (gradients of gradients, forward accumulators, untaped graphs).
      residuals: a `Residuals` while a forward or backward program is traced.
      block, two_input_block, group_matmul_limit: from the `Policy`.
    """

    for_xla: bool = False
    block_sums: bool = False
    differentiable: bool = False
    residuals: Residuals = None
    block: int = DEFAULT.block
    two_input_block: int = DEFAULT.two_input_block
    group_matmul_limit: int = DEFAULT.group_matmul_limit

    def residual(self, tensor):
        """`tensor`, recorded for (or replayed from) the backward program when one is traced."""
        return tensor if self.residuals is None else self.residuals.take(tensor)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, policy, **flags):
        """A `Build` with `flags`, and the policy's block sizes where the sums are built in blocks:
        elsewhere they are unread, and as part of a program's cache key would only retrace it when
        they change."""
        if not flags.get("block_sums"):
            return cls(**flags)
        blocks = (policy.block, policy.two_input_block, policy.group_matmul_limit)
        return cls(**dict(zip(("block", "two_input_block", "group_matmul_limit"), blocks)), **flags)
