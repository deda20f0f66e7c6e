"""Sizes of the values a jaxpr computes (its sub-jaxprs included)."""

from __future__ import annotations

import math
from typing import Tuple

from jax.extend.core import ClosedJaxpr, Jaxpr


def largest_value(jaxpr: Jaxpr, lead: Tuple[int, ...] = ()) -> int:
  """Entries of the largest array whose shape starts with `lead` that any
  equation of `jaxpr` produces."""
  largest = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = tuple(getattr(v.aval, 'shape', ()))
      if shape[:len(lead)] == tuple(lead):
        largest = max(largest, math.prod(shape))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, Jaxpr):
          largest = max(largest, largest_value(sub, lead))
  return largest
