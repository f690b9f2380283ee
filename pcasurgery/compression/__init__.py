"""Compression (PCA layers folded into plain layers), counting, and ONNX export."""

from .compress import LowRank, compress, plan_layer
from .counting import count_macs, count_params, macs_per_position
from .export import OnnxCheckError, export_onnx, run_onnx

__all__ = [
    "LowRank",
    "OnnxCheckError",
    "compress",
    "count_macs",
    "count_params",
    "export_onnx",
    "macs_per_position",
    "plan_layer",
    "run_onnx",
]
