"""PCA layer modules and the network-wide operations on them."""

from .network import (
    change_all_pca_layer_centering,
    change_all_pca_layer_thresholds,
    change_all_pca_layer_thresholds_and_inject_random_directions,
    folded,
    inject_random_directions,
    pca_layers_of,
    set_centering,
    set_threshold,
)
from .pca import Conv2DPCALayer, LinearPCALayer, PCALayer
from .sites import Projected, Site, sites_of

__all__ = [
    "Conv2DPCALayer",
    "LinearPCALayer",
    "PCALayer",
    "Projected",
    "Site",
    "change_all_pca_layer_centering",
    "change_all_pca_layer_thresholds",
    "change_all_pca_layer_thresholds_and_inject_random_directions",
    "folded",
    "inject_random_directions",
    "pca_layers_of",
    "set_centering",
    "set_threshold",
    "sites_of",
]
