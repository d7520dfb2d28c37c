"""The graph passes, one per file, and the named pipelines built from them."""
from __future__ import annotations

from onnxfp8.config import QuantConfig
from onnxfp8.pipeline import Pipeline


def standard_pipeline(config: QuantConfig = None) -> Pipeline:
    """canonicalize -> fold_batchnorm -> select_ops -> calibrate -> assign_formats -> insert_qdq -> cleanup"""
    from onnxfp8.passes.assign_formats import AssignFormats
    from onnxfp8.passes.calibrate import Calibrate
    from onnxfp8.passes.canonicalize import Canonicalize
    from onnxfp8.passes.cleanup import Cleanup
    from onnxfp8.passes.fold_batchnorm import FoldBatchNorm
    from onnxfp8.passes.insert_qdq import InsertQDQ
    from onnxfp8.passes.select_ops import SelectOps

    return Pipeline("standard", [Canonicalize(), FoldBatchNorm(), SelectOps(), Calibrate(), AssignFormats(),
                                 InsertQDQ(), Cleanup()])


PIPELINES = {"standard": standard_pipeline}


def pipeline_for(config: QuantConfig) -> Pipeline:
    builder = PIPELINES.get(config.scheme, standard_pipeline)
    return builder(config)
