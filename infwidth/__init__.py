"""infwidth: infinite-width NNGP and NTK kernels of any JAX function."""

from infwidth.kernel import Kernel
from infwidth.batching import batch
from infwidth import predict
from infwidth.errors import InfwidthError, UnsupportedPrimitiveError
from infwidth.kernelize import ParamStats, kernelize
from infwidth.empirical import empirical_ntk_fn, empirical_nngp_fn, empirical_kernel_fn, monte_carlo_kernel_fn, linearize, taylor_expand, NtkImplementation
from infwidth import stax
