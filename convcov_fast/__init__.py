"""convcov_fast: covariance-based initialization and fast frozen depthwise convolution.

Filters of depthwise convolutions are sampled from N(0, cov) with structured covariances
(Trockman, Willmott and Kolter, "Understanding the Covariance Structure of Convolutional
Filters", ICLR 2023), and frozen filters get a convolution whose backward skips the weight
gradient.
"""

from . import covariance, models
from .layers import FrozenCovDepthwiseConv2d, convert
from .ops import depthwise_conv2d
from .sampling import factorize, init_, sample

__version__ = "0.1.0"

__all__ = [
    "FrozenCovDepthwiseConv2d",
    "convert",
    "covariance",
    "depthwise_conv2d",
    "factorize",
    "init_",
    "models",
    "sample",
]
