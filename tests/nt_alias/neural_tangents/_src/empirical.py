"""The one private name Neural Tangents' tests read from `_src.empirical`: the
empirical NTK implementation they compare analytic kernels with."""

from infwidth import NtkImplementation

_DEFAULT_TESTING_NTK_IMPLEMENTATION = NtkImplementation.JACOBIAN_CONTRACTION
