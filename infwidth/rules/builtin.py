"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import conv, elementwise, linear, reductions, spatial, structural  # noqa: F401
