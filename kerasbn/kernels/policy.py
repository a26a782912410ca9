"""The engine's tunables, in one documented policy: a process default and per-thread blocks.

Every number the router and the math read is a field of `Policy`. The
process default is set with `set_xla_policy`; a `with xla_policy(...)` block
(and `jit_disabled()`) overrides fields for the current thread only, nests,
and restores what it found, so two threads never see each other's blocks.
The policy is read while a kernel call is traced: graphs already traced keep
the policy they were traced with. Why each default: docs/decisions/.
"""

import contextlib
import dataclasses
import threading

PLATFORMS = ("cpu", "cpu-onednn", "gpu")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which route a kernel call takes, and the sizes its math is arranged with.

    Attributes:
      warmup_calls: int >= 0, default 50. Training calls at an input shape run
        the plain programs this many times before XLA compiles that shape; 0
        compiles at the first call (docs/decisions/001-xla-only-for-recurring-shapes.md).
      max_shapes: int >= 0, default 16. Shapes compiled per layer; further
        shapes stay plain, with a one-time warning. 0 never compiles.
      min_elements: int >= 0, default 2^20. Training inputs with fewer
        elements never run XLA programs: inline ops when the shape is known
        while tracing, plain programs otherwise
        (docs/decisions/002-xla-min-elements.md).
      fused_min_elements: int >= 0, default 96 Ki. With oneDNN, `BatchNorm`
        training inputs (float32 NHWC, static shape, no mask) of at least this
        many elements run TensorFlow's fused batch-norm op
        (docs/decisions/003-onednn-fused-training-threshold.md).
      block: int >= 1, default 16. Elements per first-stage block of the sums
        built for XLA's CPU backend (docs/decisions/007-block-sums-for-xla-cpu.md).
      two_input_block: int >= 1, default 8. The same for sums reading two
        tensors at once (the backward's pair of sums).
      group_matmul_limit: int >= 0, default 16. Per-group sums add their
        partial sums with one block-diagonal product up to this many groups.
      jit: bool, default True. False runs plain programs only (what
        `jit_disabled()` sets for its thread).
      platform: None (default: as TensorFlow runs, "cpu" or "cpu-onednn"),
        or one of "cpu", "cpu-onednn", "gpu": the platform the router
        assumes. "gpu" is designed on paper, untested
        (docs/decisions/022-gpu-route-untested.md).
    """

    warmup_calls: int = 50
    max_shapes: int = 16
    min_elements: int = 1 << 20
    fused_min_elements: int = 96 * 1024
    block: int = 16
    two_input_block: int = 8
    group_matmul_limit: int = 16
    jit: bool = True
    platform: str = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "jit":
                if not isinstance(value, bool):
                    raise TypeError(f"Argument `jit` must be a bool. Received: jit={value!r}")
            elif field.name == "platform":
                if value is not None and value not in PLATFORMS:
                    raise ValueError(
                        f"Argument `platform` must be None or one of {PLATFORMS}. "
                        f"Received: platform={value!r}"
                    )
            else:
                least = 1 if "block" in field.name else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(
                        f"Argument `{field.name}` must be an int >= {least}. "
                        f"Received: {field.name}={value!r}"
                    )


DEFAULT = Policy()
_default = DEFAULT
_lock = threading.Lock()
_local = threading.local()


def _overrides():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current():
    """The `Policy` in force in this thread: the process default and this thread's blocks."""
    policy = _default
    for overrides in _overrides():
        policy = dataclasses.replace(policy, **overrides)
    return policy


def _given(fields):
    """The fields given (not None), checked by building a `Policy` with them."""
    given = {name: value for name, value in fields.items() if value is not None}
    unknown = set(given) - {field.name for field in dataclasses.fields(Policy)}
    if unknown:
        raise TypeError(f"Unknown policy fields: {sorted(unknown)}")
    dataclasses.replace(DEFAULT, **given)
    return given


def get_xla_policy():
    """This thread's policy as a dict of every field (see `Policy`)."""
    return dataclasses.asdict(current())


def set_xla_policy(**fields):
    """Sets policy fields (see `Policy` for each): process-wide outside any
    `xla_policy` block, else in this thread's innermost block, which then
    undoes them on exit.

    `ValueError`/`TypeError` naming the field for a bad value or an unknown
    name.
    """
    global _default
    given = _given(fields)
    stack = _overrides()
    if stack:
        stack[-1] = {**stack[-1], **given}
        return
    with _lock:
        _default = dataclasses.replace(_default, **given)


@contextlib.contextmanager
def xla_policy(**fields):
    """Overrides policy fields for the current thread within a `with` block.

    Blocks nest, and `set_xla_policy` inside a block changes that block
    only: on exit this thread's policy is what it was, and no other thread
    ever sees it (`with xla_policy(): ...` scopes whatever the body sets).
    """
    stack = _overrides()
    stack.append(_given(fields))
    depth = len(stack)
    try:
        yield
    finally:
        del stack[depth - 1 :]


def jit_disabled():
    """Within this block (this thread only), layers call the plain, non-XLA kernels."""
    return xla_policy(jit=False)


def xla_allowed():
    """Whether kernels may be XLA-compiled in the current thread."""
    return current().jit
