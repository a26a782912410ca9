"""The engine's tunables, in one documented policy: a process default and per-thread blocks.

Every number the router and the math read is a field of `Policy`, read while a kernel call is
traced: graphs already traced keep the policy they were traced with. Why each default:
docs/decisions/.
"""

import contextlib
import dataclasses
import threading

from kerasbn.kernels import tf_internals

PLATFORMS = ("cpu", "cpu-onednn", "gpu")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Which route a kernel call takes, and the sizes its math is arranged with.

    Attributes (a bad value raises `ValueError` naming the field, `TypeError` for `jit`):
      warmup_calls: int >= 0, default 50. Training calls at an input shape on the plain programs
        before XLA compiles it; 0 compiles at once (docs/decisions/001-xla-only-for-recurring-shapes.md).
      max_shapes: int >= 0, default 16. Shapes compiled per layer, further ones staying plain with
        a one-time warning; 0 never compiles.
      min_elements: int >= 0, default 2^20. Smaller training inputs never run XLA programs: inline
        ops when the shape is static, else plain programs (docs/decisions/002-xla-min-elements.md).
      fused_min_elements: int >= 0, default 96 Ki. With oneDNN, `BatchNorm` training inputs this
        large (float32 NHWC, static shape, no mask) run TensorFlow's fused batch-norm op
        (docs/decisions/003-onednn-fused-training-threshold.md).
      block: int >= 1, default 8. Elements per first-stage block of the sums built for XLA's CPU
        backend (docs/decisions/007-block-sums-for-xla-cpu.md, 025-sums-at-read-speed.md).
      two_input_block: int >= 1, default 8. The same for sums reading two tensors at once.
      group_matmul_limit: int >= 0, default 16. Per-group sums add their partial sums with one
        block-diagonal product up to this many groups.
      jit: bool, default True. False: plain programs only (what `jit_disabled()` sets).
      platform: None (default: "cpu" or "cpu-onednn", as TensorFlow runs), "cpu", "cpu-onednn" or
        "gpu" (on paper, untested: docs/decisions/022-gpu-route-untested.md): the platform the
        router assumes.
    """

    warmup_calls: int = 50
    max_shapes: int = 16
    min_elements: int = 1 << 20
    fused_min_elements: int = 96 * 1024
    block: int = 8
    two_input_block: int = 8
    group_matmul_limit: int = 16
    jit: bool = True
    platform: str = None

    def __post_init__(self):
        ints = [field.name for field in dataclasses.fields(self) if field.name not in ("jit", "platform")]
        for name in ints:
            value, least = getattr(self, name), 1 if "block" in name else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Argument `{name}` must be an int >= {least}. Received: {name}={value!r}")
        if not isinstance(self.jit, bool):
            raise TypeError(f"Argument `jit` must be a bool. Received: jit={self.jit!r}")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ValueError(
                f"Argument `platform` must be None or one of {PLATFORMS}. "
                f"Received: platform={self.platform!r}"
            )


DEFAULT = Policy()
_default = DEFAULT
_lock = threading.Lock()
_local = threading.local()


def _overrides():
    """This thread's `xla_policy` blocks' overrides, innermost last."""
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _follow_into_replica_threads():
    """What `MirroredStrategy`'s replica threads, which trace the replicas' layers, run first: a
    copy of this thread's blocks (`tf_internals.on_replica_thread_start`)."""
    # Blocks are never changed in place (`set_xla_policy` replaces the innermost), so copying
    # the list suffices, here and per replica thread.
    blocks = list(_overrides())

    def start():  # and a block of its own: what a replica sets stays in its thread
        _local.stack = blocks + [{}]

    return start


tf_internals.on_replica_thread_start(_follow_into_replica_threads)


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
    """Sets policy fields (see `Policy` for each; None leaves a field as it is): process-wide
    outside any `xla_policy` block, else in this thread's innermost block, which then undoes
    them on exit. `ValueError`/`TypeError` naming the field for a bad value or an unknown name."""
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
    """Overrides policy fields (errors as `set_xla_policy`) for the current thread only within a
    `with` block. Blocks nest, and `set_xla_policy` inside one changes that block only: on exit
    this thread's policy is what it was (`with xla_policy(): ...` scopes whatever the body sets)."""
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
