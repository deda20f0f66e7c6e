"""Neural Tangents' public names, served by infwidth: lets Neural Tangents' own
test suite run against infwidth with its imports unchanged (`run_nt_tests.py`).
Test-only; never imported by infwidth."""

from infwidth import (Kernel, NtkImplementation, batch, empirical_kernel_fn,  # noqa: F401
                      empirical_nngp_fn, empirical_ntk_fn, empirical_ntk_vp_fn,
                      linearize, monte_carlo_kernel_fn,
                      predict, taylor_expand)
from neural_tangents import stax  # noqa: F401,E402

__version__ = '0.6.5'
