"""A jaxpr as a flat list of operations: calls inlined, variables renamed to ints.

The structured empirical NTK (`infwidth.empirical.structured`) evaluates and
analyses programs in this form; inlining `jit`, `closed_call` and `remat`
(from the one compatibility table) lets it see the parameter uses inside them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Tuple

from jax.extend import core as jcore

from infwidth.interpreters.compat import closed_call_p, jit_p, remat_p, subjaxpr_of

#: Higher-order primitives whose body is inlined (a jit is just a function).
INLINED = tuple(p for p in (jit_p, closed_call_p, remat_p) if p is not None)


@dataclasses.dataclass(frozen=True)
class Lit:
  """A constant operand."""
  val: Any


@dataclasses.dataclass
class Op:
  prim: Any
  ins: Tuple[Any, ...]   # int ids or `Lit`s
  outs: Tuple[int, ...]
  params: Dict[str, Any]
  eqn: Any


@dataclasses.dataclass
class Program:
  """A jaxpr with calls inlined and variables renamed to ints."""
  in_ids: List[int]
  out_atoms: List[Any]
  ops: List[Op]
  avals: Dict[int, Any]


def flatten(closed: jcore.ClosedJaxpr) -> Program:
  """`closed` as a `Program`."""
  avals, ops = {}, []
  counter = itertools.count()

  def new(var) -> int:
    i = next(counter)
    avals[i] = var.aval
    return i

  def read(env, v):
    return Lit(v.val) if isinstance(v, jcore.Literal) else env[v]

  def walk(jaxpr: jcore.Jaxpr, env: Dict[Any, Any]):
    for eqn in jaxpr.eqns:
      ins = tuple(read(env, v) for v in eqn.invars)
      if eqn.primitive in INLINED:
        inner, consts = subjaxpr_of(eqn)
        sub = {cv: Lit(c) for cv, c in zip(inner.constvars, consts)}
        sub.update(zip(inner.invars, ins))
        walk(inner, sub)
        for ov, iv in zip(eqn.outvars, inner.outvars):
          env[ov] = read(sub, iv)
      else:
        outs = tuple(new(v) for v in eqn.outvars)
        env.update(zip(eqn.outvars, outs))
        ops.append(Op(eqn.primitive, ins, outs, dict(eqn.params), eqn))

  jaxpr = closed.jaxpr
  env = {cv: Lit(c) for cv, c in zip(jaxpr.constvars, closed.consts)}
  in_ids = [new(v) for v in jaxpr.invars]
  env.update(zip(jaxpr.invars, in_ids))
  walk(jaxpr, env)
  return Program(in_ids, [read(env, v) for v in jaxpr.outvars], ops, avals)
