"""Finite-width kernels: empirical NNGP/NTK, Monte Carlo, linearization."""

from infwidth.empirical.linearize import linearize, taylor_expand
from infwidth.empirical.monte_carlo import monte_carlo_kernel_fn
from infwidth.empirical.ntk import (DEFAULT_NTK_IMPLEMENTATION,
                                    NtkImplementation, empirical_kernel_fn,
                                    empirical_kernels, empirical_nngp_fn,
                                    empirical_ntk_fn, empirical_ntk_vp_fn)

__all__ = [
    'DEFAULT_NTK_IMPLEMENTATION', 'NtkImplementation', 'empirical_kernel_fn',
    'empirical_kernels', 'empirical_nngp_fn', 'empirical_ntk_fn', 'empirical_ntk_vp_fn',
    'linearize',
    'monte_carlo_kernel_fn', 'taylor_expand',
]
