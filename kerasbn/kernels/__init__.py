"""Pure TensorFlow kernels for normalization layers.

Nothing in this package knows about Keras: every function takes tensors and
Python configuration and returns tensors. The layers in `kerasbn.layers` own
the weights and the flags and call these kernels; `routing.choose_route`
decides how each call runs (docs/layout.md), `policy.Policy` holds the tunables.
"""

from kerasbn.kernels.batch_norm import batch_norm_inference
from kerasbn.kernels.explain import Explanation, explain
from kerasbn.kernels.group_norm import group_norm
from kerasbn.kernels.policy import Policy, get_xla_policy, jit_disabled, set_xla_policy
from kerasbn.kernels.policy import xla_allowed, xla_policy
from kerasbn.kernels.routing import ROUTES, CallFacts, Route, choose_route
from kerasbn.kernels.training_step import normalize_batch, train_step
from kerasbn.kernels.warmup import ShapeUse

__all__ = [
    "CallFacts", "Explanation", "Policy", "ROUTES", "Route", "ShapeUse", "batch_norm_inference",
    "choose_route", "explain", "get_xla_policy", "group_norm", "jit_disabled", "normalize_batch",
    "set_xla_policy", "train_step", "xla_allowed", "xla_policy",
]
