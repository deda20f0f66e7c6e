"""Registers the built-in kernel rules (imported by the kernel interpreter)."""

from infwidth.rules import (conv, elementwise, linear, max_pool, random, reductions,  # noqa: F401
                            spatial, structural)
