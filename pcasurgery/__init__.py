"""pcasurgery: PyTorch model surgery with PCA layers.

Wrap a model with PCA layers, calibrate them on real data, read how much of
each layer's width the network uses, and fold the kept eigendirections into
smaller layers.
"""

from . import metrics, pca_layers, torch_utils, writers
from ._errors import NonFiniteError, NotCalibratedError, OnnxCheckError, PCASurgeryError
from .analysis import (
    allocate,
    apply_plan,
    budget_plan,
    calibrate_sequential,
    compress_sequential,
    forward_sequential,
    plot_saturation,
    report,
    sweep,
)
from .compression import (
    compress,
    compression_plan,
    count_macs,
    count_params,
    export_onnx,
    heal,
    load_compressed,
    save_compressed,
)
from .core.covariance_matrix import TorchCovarianceMatrix
from .layers import (
    Conv2DPCALayer,
    LinearPCALayer,
    PCALayer,
    folded,
    inject_random_directions,
    pca_layers_of,
    set_centering,
    set_threshold,
)
from .surgery import all_reduce_statistics, calibrate, pca_wrap
from .tracking import CheckLayerSat, SaturationTracker

__version__ = "0.1.0"

__all__ = [
    "CheckLayerSat",
    "Conv2DPCALayer",
    "LinearPCALayer",
    "NonFiniteError",
    "NotCalibratedError",
    "OnnxCheckError",
    "PCASurgeryError",
    "PCALayer",
    "SaturationTracker",
    "TorchCovarianceMatrix",
    "__version__",
    "all_reduce_statistics",
    "allocate",
    "apply_plan",
    "budget_plan",
    "calibrate",
    "compress",
    "calibrate_sequential",
    "compress_sequential",
    "forward_sequential",
    "compression_plan",
    "count_macs",
    "count_params",
    "export_onnx",
    "folded",
    "heal",
    "inject_random_directions",
    "load_compressed",
    "metrics",
    "pca_layers",
    "pca_layers_of",
    "pca_wrap",
    "plot_saturation",
    "report",
    "save_compressed",
    "set_centering",
    "set_threshold",
    "sweep",
    "torch_utils",
    "writers",
]
