"""Pure TensorFlow kernels for normalization layers.

Nothing in this package knows about Keras: every function takes tensors and
Python configuration and returns tensors. The layers in `kerasbn.layers` own the
weights and the flags and call these kernels.
"""

from kerasbn.kernels.compile import jit_disabled, xla_allowed
from kerasbn.kernels.batch_norm import batch_norm_inference, batch_norm_train
from kerasbn.kernels.synchronized import synchronized_batch_norm_train

__all__ = [
    "batch_norm_inference",
    "batch_norm_train",
    "jit_disabled",
    "synchronized_batch_norm_train",
    "xla_allowed",
]
