"""infwidth: infinite-width NNGP and NTK kernels of any JAX function."""

from infwidth.kernel import Kernel
