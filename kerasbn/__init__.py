"""kerasbn: normalization layers for Keras 3 on TensorFlow.

Correct, XLA-compiled, and exportable to TF Serving.
"""

from kerasbn.backend_check import require_tensorflow_backend

require_tensorflow_backend()

from kerasbn.conversion import convert, layers_in_scope, to_keras  # noqa: E402
from kerasbn.export import export_for_serving  # noqa: E402
from kerasbn.layers import BatchNorm, BatchRenorm, GroupNorm  # noqa: E402
from kerasbn.recalibration import LayerReport, recalibrate  # noqa: E402
from kerasbn.schedules import LinearRamp, paper_renorm_clipping  # noqa: E402
from kerasbn._version import __version__  # noqa: E402

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "LayerReport",
    "LinearRamp",
    "__version__",
    "convert",
    "export_for_serving",
    "layers_in_scope",
    "paper_renorm_clipping",
    "recalibrate",
    "to_keras",
]
