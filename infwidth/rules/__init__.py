"""Kernel rules, one module per family of primitives.

`registry.REGISTRY` maps each primitive to its `Registration` (rule and
facts); importing `infwidth.rules.builtin` registers the built-in rules.
`register` adds a rule for a new primitive.
"""

from infwidth.rules.registry import KERNEL_RULES, REGISTRY, register  # noqa: F401
