"""kerasbn: normalization layers for Keras 3 on TensorFlow.

Correct, XLA-compiled, and exportable to TF Serving.
"""

from kerasbn.backend_check import require_tensorflow_backend

require_tensorflow_backend()

from kerasbn.layers import BatchNorm  # noqa: E402
from kerasbn.recalibration import LayerReport, recalibrate  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BatchNorm", "LayerReport", "__version__", "recalibrate"]
