"""A private copy of the elementwise tail of each output of a jaxpr.

XLA:CPU fuses a loop of elementwise work into one kernel per output. When two
outputs share elementwise intermediates, as the NTK recursion shares the
NNGP's, it materialises each shared intermediate instead (measured for a
3-layer ReLU MLP: twice the time of both recursions done separately). So each
output after the first gets its own copy of its *tail*: the equations it
depends on through elementwise and data-movement primitives only, back to the
values that are materialised anyway (results of contractions, reductions,
loops; inputs). Those are passed through `lax.optimization_barrier`, which
keeps XLA from merging the copy with the original; a copy only recomputes what
a fused loop would recompute per element anyway.

`plan_tails(jaxpr, opaque)` finds the tails; `eval_tail` evaluates one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence

from jax import lax
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal

from infwidth.interpreters.compat import CALL_PRIMITIVES, bind_equation, subjaxpr_of

#: Primitives whose results XLA materialises: a tail stops at them.
_MATERIALISED = frozenset({
    'dot_general', 'conv_general_dilated', 'reduce_sum', 'reduce_max', 'reduce_min',
    'reduce_prod', 'reduce_and', 'reduce_or', 'reduce_xor', 'reduce_precision', 'argmax',
    'argmin', 'reduce', 'cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp',
    'reduce_window', 'reduce_window_sum', 'reduce_window_max', 'reduce_window_min',
    'select_and_scatter_add', 'sort', 'top_k', 'fft', 'scan', 'while', 'cond',
    'gather', 'scatter', 'scatter-add', 'scatter_add', 'dynamic_slice',
    'dynamic_update_slice', 'custom_call', 'optimization_barrier', 'rng_bit_generator',
    'random_bits', 'random_seed', 'random_wrap', 'random_unwrap', 'threefry2x32',
    'linear_solve', 'custom_linear_solve', 'triangular_solve', 'cholesky', 'eig', 'eigh',
    'lu', 'qr', 'svd', 'householder_product', 'pure_callback', 'io_callback',
    'shard_map', 'pmap', 'xla_pmap', 'all_gather', 'psum', 'all_to_all', 'ppermute',
})


def is_elementwise_like(eqn) -> bool:
  """Whether XLA fuses `eqn` into a loop of its consumers (no materialised result)."""
  if eqn.effects:
    return False
  if eqn.primitive in CALL_PRIMITIVES:
    return _all_elementwise_like(subjaxpr_of(eqn)[0])
  if eqn.primitive.name in _MATERIALISED:
    return False
  # Any other primitive with a sub-jaxpr is control flow.
  return not any(isinstance(p, (Jaxpr, ClosedJaxpr)) for p in eqn.params.values())


def _all_elementwise_like(jaxpr: Jaxpr) -> bool:
  return all(is_elementwise_like(e) for e in jaxpr.eqns)


@dataclasses.dataclass
class Tail:
  """Equations (indices, in order) that compute an output from `frontier`."""
  eqns: List[int]
  frontier: List[Any]


def plan_tails(jaxpr: Jaxpr, opaque: FrozenSet[int] = frozenset()) -> List[Optional[Tail]]:
  """Per output of `jaxpr`: the tail to copy, or None (the first output of
  each value, outputs that share nothing, and outputs with no tail).

  `opaque`: equation indices that are evaluated otherwise (a scan); their
  results are materialised.
  """
  defs = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars
          if not isinstance(v, DropVar)}
  cheap = [i not in opaque and is_elementwise_like(e) for i, e in enumerate(jaxpr.eqns)]
  tails: List[Optional[Tail]] = []
  claimed: set = set()      # tail equations of earlier outputs
  seen_outputs: set = set()
  for out in jaxpr.outvars:
    if isinstance(out, Literal) or out not in defs or not cheap[defs[out]]:
      tails.append(None)
      continue
    eqns, frontier = _tail_of(jaxpr, out, defs, cheap)
    if out in seen_outputs or not claimed & set(eqns):
      tails.append(None)
    else:
      tails.append(Tail(eqns, frontier))
    claimed |= set(eqns)
    seen_outputs.add(out)
  return tails


def _tail_of(jaxpr: Jaxpr, out, defs: Dict[Any, int], cheap: Sequence[bool]):
  members, frontier, stack = set(), {}, [out]
  while stack:
    v = stack.pop()
    i = defs.get(v)
    if i is None or not cheap[i]:
      frontier.setdefault(v, None)
      continue
    if i in members:
      continue
    members.add(i)
    stack.extend(u for u in jaxpr.eqns[i].invars if not isinstance(u, Literal))
  return sorted(members), list(frontier)


def eval_tail(jaxpr: Jaxpr, tail: Tail, out, read: Callable[[Any], Any]):
  """The value of output variable `out` recomputed by `tail` from barriered
  frontier values (`read` gives the values of the original evaluation)."""
  env: Dict[Any, Any] = dict(zip(tail.frontier,
                                 lax.optimization_barrier([read(v) for v in tail.frontier])))

  def get(v):
    return v.val if isinstance(v, Literal) else env[v]

  for i in tail.eqns:
    eqn = jaxpr.eqns[i]
    for v, x in zip(eqn.outvars, bind_equation(eqn, [get(v) for v in eqn.invars])):
      if not isinstance(v, DropVar):
        env[v] = x
  return env[out]


def needed_equations(jaxpr: Jaxpr, tails: Sequence[Optional[Tail]],
                     always: FrozenSet[int] = frozenset()) -> List[bool]:
  """Per equation, whether the evaluation needs it once the outputs with a
  tail are computed by their tails (`always`: equations evaluated regardless)."""
  defs = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars
          if not isinstance(v, DropVar)}
  roots = [v for v, t in zip(jaxpr.outvars, tails) if t is None]
  roots += [v for t in tails if t is not None for v in t.frontier]
  roots += [v for i in always for v in jaxpr.eqns[i].outvars if not isinstance(v, DropVar)]
  needed = [False] * len(jaxpr.eqns)
  stack = [v for v in roots if not isinstance(v, Literal)]
  while stack:
    i = defs.get(stack.pop())
    if i is None or needed[i]:
      continue
    needed[i] = True
    stack.extend(u for u in jaxpr.eqns[i].invars if not isinstance(u, Literal))
  return needed
