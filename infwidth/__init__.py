"""infwidth: infinite-width NNGP and NTK kernels of any JAX function."""

from infwidth.kernel import Kernel
from infwidth.empirical import empirical_ntk_fn, empirical_nngp_fn, empirical_kernel_fn, monte_carlo_kernel_fn, linearize, taylor_expand, NtkImplementation
