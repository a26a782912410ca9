"""kerasbn: normalization layers for Keras 3 on TensorFlow.

"""

from kerasbn.backend_check import require_tensorflow_backend

require_tensorflow_backend()

from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm  # noqa: E402
from kerasbn.recalibration import LayerReport, recalibrate  # noqa: E402
from kerasbn.schedules import LinearRamp, paper_renorm_clipping  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "LayerReport",
    "LinearRamp",
    "__version__",
    "paper_renorm_clipping",
    "recalibrate",
]
