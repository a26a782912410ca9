"""Pure TensorFlow kernels for normalization layers.

Nothing in this package knows about Keras: every function takes tensors and
Python configuration and returns tensors. The layers in `kerasbn.layers` own the
weights and the flags and call these kernels.
"""

from kerasbn.kernels.compile import jit_disabled, xla_allowed
from kerasbn.kernels.warmup import ShapeUse, get_xla_policy, set_xla_policy, xla_policy
from kerasbn.kernels.batch_norm import batch_norm_inference, batch_norm_train
from kerasbn.kernels.batch_renorm import batch_renorm_train
from kerasbn.kernels.ghost_batch_norm import ghost_batch_norm_train, ghost_batch_renorm_train
from kerasbn.kernels.group_norm import group_norm
from kerasbn.kernels.synchronized import (
    synchronized_batch_norm_train,
    synchronized_batch_renorm_train,
)

__all__ = [
    "ShapeUse",
    "batch_norm_inference",
    "batch_norm_train",
    "batch_renorm_train",
    "get_xla_policy",
    "ghost_batch_norm_train",
    "ghost_batch_renorm_train",
    "group_norm",
    "jit_disabled",
    "set_xla_policy",
    "synchronized_batch_norm_train",
    "synchronized_batch_renorm_train",
    "xla_allowed",
    "xla_policy",
]
