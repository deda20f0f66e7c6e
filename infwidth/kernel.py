"""The `Kernel` pytree that kernel functions return with `get=None`."""

from infwidth.domain.kernel import Kernel, kernel_namedtuple  # noqa: F401

__all__ = ['Kernel', 'kernel_namedtuple']
