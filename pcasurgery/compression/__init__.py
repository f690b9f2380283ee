"""Compression (PCA layers folded into plain layers), counting, and ONNX export."""

from .checkpoint import load_compressed, save_compressed
from .compress import LowRank, compress
from .counting import count_macs, count_params, macs_per_position
from .export import export_onnx, run_onnx
from .heal import heal
from .plan import compression_plan

__all__ = [
    "LowRank",
    "compress",
    "compression_plan",
    "count_macs",
    "count_params",
    "export_onnx",
    "heal",
    "load_compressed",
    "macs_per_position",
    "run_onnx",
    "save_compressed",
]
