"""The private TensorFlow APIs kerasbn uses: here and nowhere else.

Private `tensorflow.python.*` modules move or change between releases. Each is imported here once,
behind a function with a public meaning whose fallback, when the API is gone, sends the kernels
down their exact but slower path (autodiff of the plain formula instead of the hand-derived
gradient, `engine.Kernel`; no assumption of an outer XLA program): an upgrade costs speed, never
correctness. `MISSING` lists what was not found (a test fails loudly on it);
`without_private_apis()` runs a block as on such a release (for tests).
"""

import contextlib
import importlib

import tensorflow as tf

MISSING = []


def _load(module, *names):
    """The attribute `names[0]` of `module` (a tuple of them for several names), or None, listed
    in `MISSING`, when the module or an attribute is gone."""
    try:
        found = tuple(getattr(importlib.import_module(module), name) for name in names)
    except (ImportError, AttributeError):
        MISSING.append(f"{module}.{names[0]}")
        return None
    return found if len(names) > 1 else found[0]


# Public function -> the private API it reads (None: take the fallback).
_APIS = {
    "forward_accumulator_watches": _load("tensorflow.python.eager.forwardprop_util", "pack_tangents"),
    "gradient_recorded": _load("tensorflow.python.eager.record", "should_record_backprop"),
    "gradient_possibly_watched": _load(
        "tensorflow.python.ops.gradients_util", "PossibleTapeGradientTypes", "POSSIBLE_GRADIENT_TYPES_NONE"
    ),
    "in_xla_context": _load("tensorflow.python.ops.control_flow_util", "GraphOrParentsInXlaContext"),
    "onednn_enabled": _load("tensorflow.python.util._pywrap_util_port", "IsMklEnabled"),
    "on_replica_thread_start": _load(
        "tensorflow.python.distribute.mirrored_run", "_get_thread_local_configuration_callable"
    ),
}


@contextlib.contextmanager
def without_private_apis(*functions):
    """Within this block (every thread), the named functions of this module (default: all) take
    their fallback, as on a TensorFlow release where their private API is gone. For tests.
    `ValueError` for an unknown name."""
    unknown = set(functions) - set(_APIS)
    if unknown:
        raise ValueError(
            f"Argument `functions` must name functions of {sorted(_APIS)}. Received: {sorted(unknown)}"
        )
    saved = {function: _APIS[function] for function in functions or _APIS}
    _APIS.update(dict.fromkeys(saved))
    try:
        yield
    finally:
        _APIS.update(saved)


def forward_accumulator_watches(tensors):
    """Whether an active `ForwardAccumulator` tracks a tangent of any of `tensors` (fallback: True)."""
    pack_tangents = _APIS["forward_accumulator_watches"]
    return True if pack_tangents is None else bool(pack_tangents(list(tensors)).tangents)


def gradient_recorded(tensors, unknown=True):
    """Whether an active gradient tape records operations on `tensors`. `unknown` is the answer
    when the private API is missing: True where a wrong "no" would lose a gradient, False where a
    wrong "yes" would refuse a computation that is fine."""
    should_record = _APIS["gradient_recorded"]
    return unknown if should_record is None else bool(should_record(list(tensors)))


def gradient_possibly_watched(tensors):
    """Whether a tape or forward accumulator may record a computation on `tensors`: a gradient
    computed from them being differentiated again (gradient penalty, Hessian-vector product).
    Fallback: True."""
    api = _APIS["gradient_possibly_watched"]
    if api is None:
        return True
    possible_types, none = api
    return possible_types(list(tensors)) != none


def in_xla_context():
    """Whether ops built now are compiled by an outer `tf.function(jit_compile=True)` (fallback: False)."""
    in_xla = _APIS["in_xla_context"]
    if in_xla is None or tf.executing_eagerly():
        return False
    return bool(in_xla(tf.compat.v1.get_default_graph()))


def onednn_enabled():
    """True/False as TensorFlow decided at start-up whether to run oneDNN's CPU kernels (on by
    default on x86 CPUs with AVX512-VNNI or -BF16, AVX-VNNI or AMX; `TF_ENABLE_ONEDNN_OPTS`
    overrides). Fallback: None (unknown), which the kernels treat as off."""
    is_mkl_enabled = _APIS["onednn_enabled"]
    return None if is_mkl_enabled is None else bool(is_mkl_enabled())


_REPLICA_THREAD_STARTS = []
_THREAD_CONFIGURATION = _APIS["on_replica_thread_start"]


def on_replica_thread_start(capture):
    """Registers `capture`, called in the thread where `MirroredStrategy` starts its replica
    threads; each of them runs the callable it returns before the replica function, so a setting
    of the caller's thread follows it into the threads tracing the replicas (as TensorFlow's own
    per-thread settings do, `mirrored_run._get_thread_local_configuration_callable`). Fallback:
    the replica threads start without it."""
    _REPLICA_THREAD_STARTS.append(capture)


def _replica_thread_configuration():
    callables = set(_THREAD_CONFIGURATION())
    if _APIS["on_replica_thread_start"] is not None:
        callables.update(capture() for capture in _REPLICA_THREAD_STARTS)
    return callables


if _THREAD_CONFIGURATION is not None:
    _mirrored_run = importlib.import_module("tensorflow.python.distribute.mirrored_run")
    _mirrored_run._get_thread_local_configuration_callable = _replica_thread_configuration
