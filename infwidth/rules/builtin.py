"""Registers the built-in kernel rules (imported by `infwidth.kernelize`)."""

from infwidth.rules import conv, elementwise, linear, reductions, spatial, structural  # noqa: F401
