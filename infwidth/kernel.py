"""The `Kernel` pytree that kernel functions return with `get=None`."""

from infwidth.domain.kernel import FIELDS, Kernel, kernel_namedtuple  # noqa: F401

__all__ = ['FIELDS', 'Kernel', 'kernel_namedtuple']
