"""Control-fidelity evaluation on the ControlNet++ protocol (arXiv 2404.07987): its metrics
(:mod:`~controlnext.evaluation.metrics`), the annotator models they run, loaded from local paths only
(:mod:`~controlnext.evaluation.models`), evaluation splits (:mod:`~controlnext.evaluation.data`) and the
with/without-control comparison of ControlNeXt, ControlNet and T2I-Adapter (:mod:`~controlnext.evaluation.protocol`).
`controlnext eval` is its command line; docs/evaluation.md has the commands for the published setting.
"""

from .data import EvalSplit, read_split
from .metrics import MeanIoU, binary_f1, canny_f1, canny_map, clip_score, depth_rmse, fid, frechet_distance, ms_ssim
from .protocol import (
    CONDITIONS,
    METHODS,
    METRICS,
    PROTOCOLS,
    EvalModels,
    MethodResult,
    applicable_metrics,
    evaluate_methods,
    load_method,
    markdown_table,
)

__all__ = [
    "CONDITIONS",
    "METHODS",
    "METRICS",
    "PROTOCOLS",
    "EvalModels",
    "EvalSplit",
    "MeanIoU",
    "MethodResult",
    "applicable_metrics",
    "binary_f1",
    "canny_f1",
    "canny_map",
    "clip_score",
    "depth_rmse",
    "evaluate_methods",
    "fid",
    "frechet_distance",
    "load_method",
    "markdown_table",
    "ms_ssim",
    "read_split",
]
