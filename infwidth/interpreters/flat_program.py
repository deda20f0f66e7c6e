"""A jaxpr as a flat list of operations: calls inlined, variables renamed to ints.

The structured empirical NTK (`infwidth.empirical.structured`) evaluates and
analyses programs in this form; inlining `jit`, `closed_call` and `remat`
(from the one compatibility table) lets it see the parameter uses inside them.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Sequence, Tuple

from jax.extend import core as jcore

from infwidth.interpreters.compat import closed_call_p, jit_p, remat_p
from infwidth.interpreters.walker import bind, walk

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


def flatten(closed: jcore.ClosedJaxpr, inline: Tuple[Any, ...] = INLINED) -> Program:
  """`closed` as a `Program`, the calls in `inline` inlined."""
  avals, ops = {}, []
  counter = itertools.count()

  def new(var) -> int:
    i = next(counter)
    avals[i] = var.aval
    return i

  def visit(eqn, ins, _callers):
    outs = tuple(new(v) for v in eqn.outvars)
    ops.append(Op(eqn.primitive, tuple(ins), outs, dict(eqn.params), eqn))
    return outs

  jaxpr = closed.jaxpr
  in_ids = [new(v) for v in jaxpr.invars]
  out_atoms = walk(jaxpr, closed.consts, in_ids, visit, literal=lambda v: Lit(v.val),
                   const=Lit, inline=inline)
  return Program(in_ids, out_atoms, ops, avals)


def run(prog: Program, inputs: Sequence[Any],
        perturb: Dict[int, Any]) -> Tuple[List[Any], Dict[int, Any]]:
  """Evaluates `prog` on `inputs`, adding `perturb[i]` to the first output of op `i`.

  Returns the program's outputs and the environment of every value by id.
  """
  env = dict(zip(prog.in_ids, inputs))
  read = lambda a: a.val if isinstance(a, Lit) else env[a]
  for i, op in enumerate(prog.ops):
    outs = bind(op.eqn, [read(a) for a in op.ins])
    if i in perturb:
      outs[0] = outs[0] + perturb[i]
    env.update(zip(op.outs, outs))
  return [read(a) for a in prog.out_atoms], env
