"""Kernel rules, one module per family of primitives; importing this package
registers them all in `registry.KERNEL_RULES`."""

from infwidth.rules import elementwise, linear, reductions, structural  # noqa: F401
from infwidth.rules.registry import KERNEL_RULES, register  # noqa: F401
