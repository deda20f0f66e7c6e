"""infwidth: infinite-width NNGP and NTK kernels of any JAX function."""

from infwidth import predict, stax
from infwidth.batching import batch
from infwidth.empirical import (NtkImplementation, empirical_kernel_fn, empirical_nngp_fn,
                                empirical_ntk_fn, empirical_ntk_vp_fn, linearize,
                                monte_carlo_kernel_fn, taylor_expand)
from infwidth.errors import (InfwidthError, InternalError, UnsupportedPrimitiveError,
                             UnsupportedValueError)
from infwidth.kernel import Kernel
from infwidth.kernelize import ParamStats, kernelize

__all__ = [
    'InfwidthError', 'InternalError', 'Kernel', 'NtkImplementation', 'ParamStats',
    'UnsupportedPrimitiveError', 'UnsupportedValueError', 'batch', 'empirical_kernel_fn',
    'empirical_nngp_fn', 'empirical_ntk_fn', 'empirical_ntk_vp_fn', 'kernelize', 'linearize',
    'monte_carlo_kernel_fn', 'predict', 'stax', 'taylor_expand',
]


def __dir__():
  return sorted(__all__)
