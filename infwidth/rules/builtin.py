"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import (conv, elementwise, linear, max_pool, param_concat,  # noqa: F401
                            random, reductions, spatial, stack, structural)
