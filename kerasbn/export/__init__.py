"""Export to TF Serving: inference-only SavedModels, batch norms folded.

- `folding`: the arithmetic of folding a batch norm into a kernel and bias.
- `graph`: which batch norms of a Keras model can be folded, and into what.
- `inference_model`: a copy of a model with those batch norms folded away.
- `signature`: input and output names and specs of the serving signature.
- `directory`: write a directory all at once (temporary sibling, rename).
- `inspection`: find functions marked `_XlaMustCompile` in a traced graph.
- `serving`: `export_for_serving`, which puts these together.
"""

from kerasbn.export.directory import ExportDirExistsError
from kerasbn.export.inference_model import fold_batchnorm
from kerasbn.export.serving import export_for_serving

__all__ = ["ExportDirExistsError", "export_for_serving", "fold_batchnorm"]
