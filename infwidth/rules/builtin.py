"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import (conv, elementwise, linear, random, reductions, spatial, stack,  # noqa: F401
                            structural)
