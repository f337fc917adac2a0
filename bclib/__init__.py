"""bclib: Bayesian Compression for Deep Learning (Louizos, Ullrich & Welling, NIPS 2017).

Bayesian layers with group normal-Jeffreys and group horseshoe priors (and the Sparse VD baseline),
pruning and bit-precision reduction, export to plain PyTorch and to a real compressed file.
"""
from .layers import (
    BayesianLayer,
    Conv2dGroupHS,
    Conv2dGroupNJ,
    Conv2dSVD,
    HorseshoeGlobalScale,
    LinearGroupHS,
    LinearGroupNJ,
    LinearSVD,
    bayesian_layers,
    kl_divergence,
    set_variance_dtype,
)
from .compression import CompressedModel, CompressionReport, compress
from .fileformat import load_compressed
from .models import to_bayesian

# The first version of the 2017 release (its README snippet, quoted in the book) called the NJ layers
# "group variational dropout"; later versions renamed them LinearGroupNJ / Conv2dGroupNJ.
LinearGroupVD = LinearGroupNJ
Conv2dGroupVD = Conv2dGroupNJ

__version__ = "0.1.0"

__all__ = [
    "BayesianLayer", "LinearGroupNJ", "Conv2dGroupNJ", "LinearGroupHS", "Conv2dGroupHS",
    "HorseshoeGlobalScale", "LinearSVD", "Conv2dSVD", "LinearGroupVD", "Conv2dGroupVD",
    "bayesian_layers", "kl_divergence", "set_variance_dtype", "compress", "CompressedModel", "CompressionReport",
    "load_compressed", "to_bayesian",
]
