"""Reads the jaxpr of a scalar function φ(u, *args) as an elementwise `Chain`.

Calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, ...) are inlined (their
primal jaxpr, via the table in `compat.py`), copies and float-to-float casts
dropped, dead nodes pruned. `infwidth.rules.gaussian.chain_from_fn` traces
the function and hands its jaxpr here.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex
from jax.extend.core import primitives as _p

from infwidth.interpreters.compat import CALL_PRIMITIVES, subjaxpr_of
from infwidth.rules.chain import Chain, Node, Ref, U, arg, const, node


def chain_of_jaxpr(closed, n_args: int) -> Chain:
  """The `Chain` of a closed jaxpr with scalar inputs `(u, *args)` and one output.

  Returns `Chain()` for the identity; raises ValueError for anything that is
  not an elementwise function of `u`.
  """
  nodes: List[Node] = []
  env: Dict[Any, Ref] = {}

  def read(v) -> Ref:
    if isinstance(v, jex.Literal):
      return const(v.val)
    return env[v]

  def walk(jaxpr, consts, in_refs) -> List[Ref]:
    for cv, c in zip(jaxpr.constvars, consts):
      if np.ndim(c) != 0:
        raise ValueError('chain_from_fn: the function closes over a non-scalar array')
      env[cv] = const(np.asarray(c))
    for v, r in zip(jaxpr.invars, in_refs):
      env[v] = r
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive in CALL_PRIMITIVES:
        sub, sub_consts = subjaxpr_of(eqn)
        n_skip = len(sub.invars) - len(ins)
        if n_skip:
          raise ValueError(f'chain_from_fn: cannot inline {eqn.primitive}')
        for v, r in zip(eqn.outvars, walk(sub, sub_consts, ins)):
          env[v] = r
        continue
      if len(eqn.outvars) != 1:
        raise ValueError(f'chain_from_fn: {eqn.primitive} is not elementwise')
      if eqn.primitive is _p.copy_p or (
          eqn.primitive is _p.convert_element_type_p and
          jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating) and
          jnp.issubdtype(eqn.params['new_dtype'], jnp.floating)):
        env[eqn.outvars[0]] = ins[0]
        continue
      nodes.append(Node(eqn.primitive, tuple(sorted(eqn.params.items())), tuple(ins)))
      env[eqn.outvars[0]] = node(len(nodes) - 1)
    return [read(v) for v in jaxpr.outvars]

  in_refs = [U] + [arg(i) for i in range(n_args)]
  out, = walk(closed.jaxpr, list(closed.consts), in_refs)
  if out.kind == 'u':
    return Chain((), n_args)
  if out.kind != 'node':
    raise ValueError('chain_from_fn: the function does not depend on its first argument')
  return Chain(_prune(nodes, out.index), n_args)


def _prune(nodes: List[Node], last: int) -> Tuple[Node, ...]:
  """Keeps the nodes that `last` depends on, renumbered, `last` at the end."""
  live, stack = set(), [last]
  while stack:
    j = stack.pop()
    if j in live:
      continue
    live.add(j)
    stack.extend(r.index for r in nodes[j].operands if r.kind == 'node')
  order = sorted(live)
  new_index = {j: i for i, j in enumerate(order)}
  out = []
  for j in order:
    ops = tuple(node(new_index[r.index]) if r.kind == 'node' else r for r in nodes[j].operands)
    out.append(Node(nodes[j].prim, nodes[j].params, ops))
  return tuple(out)
