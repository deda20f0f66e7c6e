"""Reads the jaxpr of a scalar function φ(u, *args) as an elementwise `Chain`.

Calls (`jit`, `custom_jvp_call`, `custom_vjp_call`, ...) are inlined by the
walker (their primal jaxpr), copies and float-to-float casts dropped, dead
nodes pruned.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as _p

from infwidth.domain.chain import Chain, Node, Ref, U, arg, const, node
from infwidth.interpreters.walker import trace, walk


def chain_from_fn(fn: Callable, n_args: int = 0, dtype=None) -> Chain:
  """The `Chain` of a scalar function φ(u, *args) (`n_args` arguments), by tracing.

  Args:
    fn: scalar elementwise function of `1 + n_args` scalars.
    n_args: number of per-input arguments after `u`.
    dtype: the dtype to trace with (default: the default float dtype), which
      sets the precision of the function's literal constants.

  Returns:
    A `Chain` with `n_args` arguments; `Chain()` for the identity.
  """
  dtype = dtype or jnp.result_type(float)
  x = jnp.zeros((), dtype)
  return chain_of_jaxpr(trace(fn, *([x] * (1 + n_args))), n_args)


def chain_of_jaxpr(closed, n_args: int) -> Chain:
  """The `Chain` of a closed jaxpr with scalar inputs `(u, *args)` and one output.

  Returns `Chain()` for the identity; raises ValueError for anything that is
  not an elementwise function of `u`.
  """
  nodes: List[Node] = []

  def scalar_const(c) -> Ref:
    if np.ndim(c) != 0:
      raise ValueError('chain_from_fn: the function closes over a non-scalar array')
    return const(np.asarray(c))

  def visit(eqn, ins, _callers):
    if len(eqn.outvars) != 1:
      raise ValueError(f'chain_from_fn: {eqn.primitive} is not elementwise')
    if eqn.primitive is _p.copy_p or (
        eqn.primitive is _p.convert_element_type_p and
        jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating) and
        jnp.issubdtype(eqn.params['new_dtype'], jnp.floating)):
      return [ins[0]]
    nodes.append(Node(eqn.primitive, tuple(sorted(eqn.params.items())), tuple(ins)))
    return [node(len(nodes) - 1)]

  in_refs = [U] + [arg(i) for i in range(n_args)]
  out, = walk(closed.jaxpr, list(closed.consts), in_refs, visit,
              literal=lambda v: const(v.val), const=scalar_const)
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
