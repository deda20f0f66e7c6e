"""Kernel rules, one module per family of primitives.

`registry.KERNEL_RULES` maps each primitive to its rule; importing
`infwidth.rules.builtin` registers the built-in rules.
"""

from infwidth.rules.registry import KERNEL_RULES, register  # noqa: F401
