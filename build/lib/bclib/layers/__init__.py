"""Bayesian layers: one module per prior (:mod:`.nj`, :mod:`.hs`, :mod:`.svd`) on a shared :mod:`.base`."""
from .base import BayesianLayer, bayesian_layers, kl_divergence, set_variance_dtype
from .hs import Conv2dGroupHS, HorseshoeGlobalScale, LinearGroupHS
from .nj import Conv2dGroupNJ, LinearGroupNJ
from .svd import Conv2dSVD, LinearSVD

__all__ = [
    "BayesianLayer", "bayesian_layers", "kl_divergence", "set_variance_dtype",
    "LinearGroupNJ", "Conv2dGroupNJ", "LinearGroupHS", "Conv2dGroupHS", "HorseshoeGlobalScale",
    "LinearSVD", "Conv2dSVD",
]
