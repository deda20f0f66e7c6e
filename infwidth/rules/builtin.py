"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import (conv, elementwise, linear, param_concat, random,  # noqa: F401
                            reductions, spatial, stack, structural)
