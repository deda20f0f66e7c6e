"""The one walk over a jaxpr that every pass of infwidth uses.

`walk(jaxpr, consts, args, visit)` runs through the equations in order,
keeping an environment from variables to values of whatever kind the pass
uses (abstract kernel values, chain references, concrete arrays, integer
ids). Call-like equations (`jit`, `closed_call`, `remat`, `custom_jvp_call`,
`custom_vjp_call`: the `inline` policy) are entered: their primal sub-jaxpr
is walked on the same values, so no pass sees them. Every other equation goes
to `visit(eqn, invals, callers)`, which returns one value per output
variable; the walker checks the count.

Also here: tracing a function to a jaxpr (`trace`), binding one equation
(`bind`, through the compatibility table), evaluating a jaxpr (`evaluate`),
iterating over every equation of a jaxpr and its sub-jaxprs (`equations`),
and the primitives of a small body jaxpr (`body_primitives`). No module
outside `interpreters/` reads `.eqns` or calls `make_jaxpr`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Sequence, Tuple

import jax
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal

from infwidth.domain.errors import InternalError
from infwidth.interpreters.compat import CALL_PRIMITIVES, bind_equation, subjaxpr_of

#: Visitor signature: `visit(eqn, invals, callers) -> list of output values`.
Visit = Callable[[Any, List[Any], Tuple[Any, ...]], Sequence[Any]]


def walk(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], visit: Visit, *,
         literal: Callable[[Literal], Any] = lambda v: v.val,
         const: Callable[[Any], Any] = lambda c: c,
         inline: Tuple[Any, ...] = CALL_PRIMITIVES,
         callers: Tuple[Any, ...] = ()) -> List[Any]:
  """Walks `jaxpr` on `args`; returns the values of its outputs.

  Args:
    jaxpr: an open `Jaxpr` (`closed.jaxpr`).
    consts: values of its constvars (passed through `const`).
    args: values of its invars.
    visit: maps an equation that is not inlined to its output values.
    literal: the value of a `Literal` operand.
    const: the value of a closed-over constant.
    inline: call-like primitives whose primal sub-jaxpr is walked in place.
    callers: enclosing call equations (innermost last), for source lines.
  """
  if len(args) != len(jaxpr.invars):
    raise InternalError(f'walk: {len(args)} arguments for {len(jaxpr.invars)} inputs')
  env = {}

  def read(v):
    return literal(v) if isinstance(v, Literal) else env[v]

  for var, c in zip(jaxpr.constvars, consts):
    env[var] = const(c)
  for var, a in zip(jaxpr.invars, args):
    env[var] = a
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive in inline:
      sub, sub_consts = subjaxpr_of(eqn)
      # custom_vjp/jvp calls pass their rule's extra operands first.
      outs = walk(sub, sub_consts, invals[len(invals) - len(sub.invars):], visit,
                  literal=literal, const=const, inline=inline, callers=callers + (eqn,))
    else:
      outs = visit(eqn, invals, callers)
    if len(outs) != len(eqn.outvars):
      raise InternalError(f'{eqn.primitive}: {len(outs)} values for '
                          f'{len(eqn.outvars)} outputs')
    for var, val in zip(eqn.outvars, outs):
      if not isinstance(var, DropVar):
        env[var] = val
  return [read(v) for v in jaxpr.outvars]


def trace(fn: Callable, *args: Any, return_shape: bool = False):
  """`jax.make_jaxpr(fn)(*args)`: the closed jaxpr of `fn` (and its output shapes)."""
  return jax.make_jaxpr(fn, return_shape=return_shape)(*args)


def bind(eqn, invals: Sequence[Any]) -> List[Any]:
  """Applies `eqn`'s primitive to concrete or traced `invals`; a list of outputs."""
  return bind_equation(eqn, list(invals))


def evaluate(closed: ClosedJaxpr, *args: Any, inline: Tuple[Any, ...] = ()) -> List[Any]:
  """`jax.core.eval_jaxpr` through the walker (calls kept unless `inline` names them)."""
  return walk(closed.jaxpr, closed.consts, args, lambda eqn, ins, _: bind(eqn, ins),
              inline=inline)


def sub_jaxprs(eqn) -> Iterator[Jaxpr]:
  """The jaxprs among an equation's parameters (bodies of calls, loops, windows)."""
  for param in eqn.params.values():
    for sub in param if isinstance(param, (tuple, list)) else (param,):
      if isinstance(sub, ClosedJaxpr):
        yield sub.jaxpr
      elif isinstance(sub, Jaxpr):
        yield sub


def equations(jaxpr: Jaxpr, recursive: bool = True) -> Iterator[Any]:
  """Every equation of `jaxpr` and, if `recursive`, of its sub-jaxprs, in order."""
  for eqn in jaxpr.eqns:
    yield eqn
    if recursive:
      for sub in sub_jaxprs(eqn):
        yield from equations(sub)


def body_primitives(body) -> List[Any]:
  """The primitives of a (closed) body jaxpr, such as a `reduce_window`'s, in order."""
  jaxpr = body.jaxpr if isinstance(body, ClosedJaxpr) else body
  return [eqn.primitive for eqn in jaxpr.eqns]
