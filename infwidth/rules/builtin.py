"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import (conv, elementwise, linear, random, reductions, spatial,  # noqa: F401
                            structural)
