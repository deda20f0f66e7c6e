"""Sizes of the values a jaxpr computes (its sub-jaxprs included)."""

from __future__ import annotations

import math
from typing import Tuple

from jax.extend.core import Jaxpr

from infwidth.interpreters.walker import equations


def largest_value(jaxpr: Jaxpr, lead: Tuple[int, ...] = ()) -> int:
  """Entries of the largest array whose shape starts with `lead` that any
  equation of `jaxpr` produces."""
  largest = 0
  for eqn in equations(jaxpr):
    for v in eqn.outvars:
      shape = tuple(getattr(v.aval, 'shape', ()))
      if shape[:len(lead)] == tuple(lead):
        largest = max(largest, math.prod(shape))
  return largest
