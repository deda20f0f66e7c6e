"""The kernel-rule registry: one pure function per primitive.

A rule is called as `rule(ctx, *invals, **params)` and returns the output value
(or a list for multi-output primitives). Input values are `Det` (deterministic
arrays with axis roles), `ParamRef` (symbolic parameter views) or `Wide`
values (see `infwidth.algebra`). Rules ignore parameters they do not need.
"""

from __future__ import annotations

from typing import Callable, Dict, Set

KERNEL_RULES: Dict[object, Callable] = {}


def register(*prims):
  """Decorator: registers a kernel rule for one or more primitives."""
  def wrap(rule):
    for p in prims:
      KERNEL_RULES[p] = rule
    return rule
  return wrap


#: Rules that accept values concatenated along the channel axis
#: (`algebra.ChannelConcat`); the interpreter reports them to any other rule.
CHANNEL_CONCAT_RULES: Set[Callable] = set()


def accepts_channel_concat(rule):
  """Decorator: marks a rule as handling `ChannelConcat` operands itself."""
  CHANNEL_CONCAT_RULES.add(rule)
  return rule
