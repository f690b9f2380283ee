"""The seed library's ``torch_utils`` module."""

from .core.covariance_matrix import TorchCovarianceMatrix

__all__ = ["TorchCovarianceMatrix"]
