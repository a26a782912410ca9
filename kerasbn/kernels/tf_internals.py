"""The private TensorFlow APIs kerasbn uses: here and nowhere else.

Private `tensorflow.python.*` modules move or change between releases. Each
one is imported here once, behind a function with a public meaning, and each
function has a fallback that keeps results exact when its API is gone:

- `forward_accumulator_watches(tensors)`: whether a `tf.autodiff.ForwardAccumulator`
  tracks any of `tensors` (`forwardprop_util.pack_tangents`). Fallback: True.
- `gradient_recorded(tensors, unknown)`: whether a gradient tape records an op
  on `tensors` (`record.should_record_backprop`). Fallback: `unknown`.
- `gradient_possibly_watched(tensors)`: whether a tape or accumulator may
  record a computation on `tensors`, i.e. a gradient being differentiated
  again (`gradients_util.PossibleTapeGradientTypes`). Fallback: True.
- `in_xla_context()`: whether the op being built will be compiled by XLA as
  part of an outer `tf.function(jit_compile=True)`
  (`control_flow_util.GraphOrParentsInXlaContext`). Fallback: False.
- `onednn_enabled()`: whether TensorFlow runs oneDNN's CPU kernels
  (`_pywrap_util_port.IsMklEnabled`, what TensorFlow's start-up message
  reports). Fallback: None (unknown), which the kernels treat as off.

With the fallbacks, the kernels take their exact but slower path: TensorFlow's
autodiff of the plain formula instead of the hand-derived gradient
(`engine.Kernel`), and no assumption of an outer XLA program. A TensorFlow
upgrade that removes one of these APIs therefore costs speed, never
correctness; `MISSING` lists what was not found, and a test fails loudly on it.
`without_private_apis()` runs a block as on such a release (for tests).
"""

import contextlib

import tensorflow as tf

MISSING = []


def _load(description, loader):
    try:
        return loader()
    except (ImportError, AttributeError):
        MISSING.append(description)
        return None


def _pack_tangents():
    from tensorflow.python.eager import forwardprop_util

    return forwardprop_util.pack_tangents


def _should_record_backprop():
    from tensorflow.python.eager import record

    return record.should_record_backprop


def _possible_gradient_types():
    from tensorflow.python.ops import gradients_util

    return gradients_util.PossibleTapeGradientTypes, gradients_util.POSSIBLE_GRADIENT_TYPES_NONE


def _xla_context():
    from tensorflow.python.ops import control_flow_util

    return control_flow_util.GraphOrParentsInXlaContext


def _is_mkl_enabled():
    from tensorflow.python.util import _pywrap_util_port

    return _pywrap_util_port.IsMklEnabled


_PACK_TANGENTS = _load("tensorflow.python.eager.forwardprop_util.pack_tangents", _pack_tangents)
_SHOULD_RECORD = _load("tensorflow.python.eager.record.should_record_backprop", _should_record_backprop)
_POSSIBLE_TYPES = _load(
    "tensorflow.python.ops.gradients_util.PossibleTapeGradientTypes", _possible_gradient_types
)
_IN_XLA_CONTEXT = _load(
    "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext", _xla_context
)
_IS_MKL_ENABLED = _load("tensorflow.python.util._pywrap_util_port.IsMklEnabled", _is_mkl_enabled)


_LOADED = {
    "forward_accumulator_watches": "_PACK_TANGENTS",
    "gradient_recorded": "_SHOULD_RECORD",
    "gradient_possibly_watched": "_POSSIBLE_TYPES",
    "in_xla_context": "_IN_XLA_CONTEXT",
    "onednn_enabled": "_IS_MKL_ENABLED",
}


@contextlib.contextmanager
def without_private_apis(*functions):
    """Within this block (every thread), the named functions of this module
    (default: all) take their fallback, as on a TensorFlow release where
    their private API is gone. For tests. `ValueError` for an unknown name."""
    unknown = set(functions) - set(_LOADED)
    if unknown:
        raise ValueError(f"Argument `functions` must name functions of {sorted(_LOADED)}. Received: {sorted(unknown)}")
    names = [_LOADED[function] for function in functions or _LOADED]
    saved = {name: globals()[name] for name in names}
    globals().update(dict.fromkeys(names))
    try:
        yield
    finally:
        globals().update(saved)


def forward_accumulator_watches(tensors):
    """Whether an active `ForwardAccumulator` tracks a tangent of any of `tensors`."""
    if _PACK_TANGENTS is None:
        return True
    return bool(_PACK_TANGENTS(list(tensors)).tangents)


def gradient_recorded(tensors, unknown=True):
    """Whether an active gradient tape records operations on `tensors`.

    `unknown` is the answer when the private API is missing: True where a
    wrong "no" would lose a gradient, False where a wrong "yes" would refuse
    a computation that is fine.
    """
    if _SHOULD_RECORD is None:
        return unknown
    return bool(_SHOULD_RECORD(list(tensors)))


def gradient_possibly_watched(tensors):
    """Whether a tape or forward accumulator may record a computation on `tensors`.

    True when a gradient computed from `tensors` is itself being
    differentiated (a gradient penalty, a Hessian-vector product).
    """
    if _POSSIBLE_TYPES is None:
        return True
    possible_types, none = _POSSIBLE_TYPES
    return possible_types(list(tensors)) != none


def in_xla_context():
    """Whether ops built now are compiled by an enclosing `tf.function(jit_compile=True)`."""
    if _IN_XLA_CONTEXT is None or tf.executing_eagerly():
        return False
    return bool(_IN_XLA_CONTEXT(tf.compat.v1.get_default_graph()))


def onednn_enabled():
    """True/False as TensorFlow decided at start-up whether to run oneDNN's CPU
    kernels (on by default on x86 CPUs with AVX512-VNNI or -BF16, AVX-VNNI or
    AMX; `TF_ENABLE_ONEDNN_OPTS` overrides); None when that cannot be told."""
    if _IS_MKL_ENABLED is None:
        return None
    return bool(_IS_MKL_ENABLED())
