"""Loops (`lax.scan`, `fori_loop`, `while_loop`) unrolled into straight-line jaxprs.

The kernel interpreter gives every equation of the network its infinite-width
meaning; a loop's body is the same network step applied `length` times, with
the same parameters at every step (weight sharing, `docs/semantics.md`). So
`unroll_loops(closed)` re-traces `closed` with each loop written out step by
step: scanned inputs are sliced per step (`xs[i]`), per-step outputs stacked
(`jnp.stack`; dropped when unused), the carry passed from one step to the next, and `reverse` runs
the steps backwards. The kernel program of the unrolled network repeats the
same block once per step, which `loop_rolling` runs as a `lax.scan` again, so
compile time does not grow with the sequence length.

Stacked per-step outputs are kept as their list of steps (`_Steps`) as long
as what reads them acts on each step alone: elementwise maps, transposes,
contractions that leave the step axis free, sums over other axes, slices of
some steps, and the next scan over them (stacked recurrent layers). A sum over
the step axis (pooling over time) is the sum of the steps, and taking one step
(`ys[:, -1]`) is that step's value. Any other use stacks them with `jnp.stack`.

A `while_loop` is unrolled when its trip count is known at trace time: its
condition must be computable from values known while tracing (a counter
started at a constant, as `fori_loop` with traced bounds and plain counting
loops have), otherwise `UnsupportedPrimitiveError` names the loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr

from infwidth.domain.errors import UnsupportedPrimitiveError
from infwidth.interpreters.compat import (CALL_PRIMITIVES, source_of, subjaxpr_of,
                                          without_dead_code)
from infwidth.interpreters.kernel_interpreter import source_location
from infwidth.interpreters.walker import bind, equations, sub_jaxprs, walk

LOOPS = ('scan', 'while')
#: Most steps a `while_loop` may take before it is taken to be unbounded.
MAX_WHILE_STEPS = 100_000


def has_loops(jaxpr: Jaxpr) -> bool:
  return any(eqn.primitive.name in LOOPS for eqn in equations(jaxpr))


def unroll_loops(closed: ClosedJaxpr) -> ClosedJaxpr:
  """`closed` with every loop written out step by step (itself if it has none)."""
  if not has_loops(closed.jaxpr):
    return closed

  def run(*args):
    return [_stacked(x) for x in _evaluate(closed.jaxpr, closed.consts, args)]

  specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
  # Per-step outputs nobody reads (a scan's stacked outputs next to its final
  # carry) are dropped, so they need no rule.
  return without_dead_code(jax.make_jaxpr(run)(*specs))


def _evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> List[Any]:
  return walk(jaxpr, consts, args, _visit, inline=())


def _known(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _visit(eqn, invals, _callers):
  if source_location(eqn) is None:
    # No line of the user's (a loop body traced inside Flax's `nn.RNN`): the
    # new equations keep the enclosing loop's line.
    return _unrolled(eqn, invals)
  with source_of(eqn):
    return _unrolled(eqn, invals)


def _unrolled(eqn, invals):
  name = eqn.primitive.name
  if name == 'scan':
    return _scan(eqn, invals)
  if name == 'while':
    return _while(eqn, [_stacked(x) for x in invals])
  if eqn.primitive in CALL_PRIMITIVES and (
      any(isinstance(x, _Steps) for x in invals) or any(has_loops(s) for s in sub_jaxprs(eqn))):
    sub, sub_consts = subjaxpr_of(eqn)
    return _evaluate(sub, sub_consts, invals[len(invals) - len(sub.invars):])
  if any(isinstance(x, _Steps) for x in invals):
    out = _per_step(eqn, invals)
    if out is not None:
      return out
    invals = [_stacked(x) for x in invals]
  if all(_known(x) for x in invals):
    # Values known while tracing (loop counters) stay known.
    with jax.ensure_compile_time_eval():
      return bind(eqn, invals)
  return bind(eqn, invals)


def _scan(eqn, invals):
  p = eqn.params
  body: ClosedJaxpr = p['jaxpr']
  n_consts, n_carry, length = p['num_consts'], p['num_carry'], p['length']
  consts = [_stacked(x) for x in invals[:n_consts]]
  carry = [_stacked(x) for x in invals[n_consts:n_consts + n_carry]]
  xs = invals[n_consts + n_carry:]
  steps = range(length - 1, -1, -1) if p['reverse'] else range(length)
  ys_by_step = {}
  for i in steps:
    x_i = [x.parts[i] if isinstance(x, _Steps) and x.axis == 0
           else lax.index_in_dim(_stacked(x), i, keepdims=False) for x in xs]
    outs = _evaluate(body.jaxpr, body.consts, list(consts) + carry + x_i)
    carry, ys_by_step[i] = list(outs[:n_carry]), outs[n_carry:]
  n_ys = len(eqn.outvars) - n_carry
  if length == 0:
    ys = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.outvars[n_carry:]]
  else:
    ys = [_Steps([ys_by_step[i][k] for i in range(length)], 0) for k in range(n_ys)]
  return carry + ys


def _while(eqn, invals):
  p = eqn.params
  cond: ClosedJaxpr = p['cond_jaxpr']
  body: ClosedJaxpr = p['body_jaxpr']
  nc, nb = p['cond_nconsts'], p['body_nconsts']
  cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
  carry = list(invals[nc + nb:])
  for _ in range(MAX_WHILE_STEPS + 1):
    (go,) = _evaluate(cond.jaxpr, cond.consts, list(cond_consts) + carry)
    if not _known(go):
      raise UnsupportedPrimitiveError(
          f'a while_loop whose trip count depends on the inputs or parameters '
          f'({_where(eqn)}): kernelize unrolls loops, so their number of steps must be '
          'known when the function is traced. Use lax.scan or lax.fori_loop with a '
          'fixed number of steps.')
    if not bool(np.asarray(go)):
      return carry
    carry = _evaluate(body.jaxpr, body.consts, list(body_consts) + carry)
  raise UnsupportedPrimitiveError(
      f'a while_loop runs more than {MAX_WHILE_STEPS} steps ({_where(eqn)}): '
      'kernelize unrolls loops step by step.')


def _where(eqn) -> str:
  return source_location(eqn) or 'while_loop'


# ----------------------------------------------------------------------------
# Per-step outputs kept as their steps.


@dataclasses.dataclass
class _Steps:
  """An array stacked from `parts` (one per step, equal shapes) along `axis`."""
  parts: List[Any]
  axis: int

  @property
  def shape(self):
    shape = list(np.shape(self.parts[0]))
    shape.insert(self.axis, len(self.parts))
    return tuple(shape)


def _stacked(x):
  return jnp.stack(x.parts, x.axis) if isinstance(x, _Steps) else x


#: Elementwise primitives (operands of one shape, or scalars).
_ELEMENTWISE = frozenset((
    'abs', 'acos', 'add', 'asin', 'atan', 'atan2', 'ceil', 'clamp', 'convert_element_type',
    'copy', 'cos', 'cosh', 'div', 'eq', 'erf', 'erf_inv', 'erfc', 'exp', 'exp2', 'expm1',
    'floor', 'ge', 'gt', 'integer_pow', 'is_finite', 'le', 'log', 'log1p', 'logistic', 'lt',
    'max', 'min', 'mul', 'ne', 'neg', 'not', 'and', 'or', 'xor', 'pow', 'round', 'rsqrt',
    'select_n', 'sign', 'sin', 'sinh', 'sqrt', 'square', 'sub', 'tan', 'tanh'))


#: Reductions over other axes act per step; over the steps' axis they combine
#: the steps: (reduction of one step, combination of two).
_REDUCTIONS = {'reduce_sum': (jnp.sum, jnp.add), 'reduce_max': (jnp.max, jnp.maximum),
               'reduce_min': (jnp.min, jnp.minimum)}


def _per_step(eqn, invals):
  """`eqn` applied to each step of its `_Steps` operands, as a list of output
  values; None where that is not how the equation acts on them."""
  name = eqn.primitive.name
  p = eqn.params
  steps = [x for x in invals if isinstance(x, _Steps)]
  axis, n = steps[0].axis, len(steps[0].parts)
  if any(s.axis != axis or len(s.parts) != n for s in steps):
    return None
  if name in _ELEMENTWISE:
    shape = steps[0].shape
    if any(not isinstance(x, _Steps) and np.ndim(x) not in (0,) and np.shape(x) != shape
           for x in invals):
      return None
    parts = [bind(eqn, [x.parts[i] if isinstance(x, _Steps)
                        else (x if np.ndim(x) == 0 else lax.index_in_dim(x, i, axis, False))
                        for x in invals]) for i in range(n)]
    return [_Steps([pt[k] for pt in parts], axis) for k in range(len(eqn.outvars))]
  (x,) = invals if len(invals) == 1 else (None,)
  if name == 'transpose' and x is not None:
    perm = p['permutation']
    inner = [d - (d > axis) for d in perm if d != axis]
    return [_Steps([lax.transpose(v, inner) for v in x.parts], perm.index(axis))]
  if name in _REDUCTIONS and x is not None:
    axes = tuple(p['axes'])
    inner = tuple(d - (d > axis) for d in axes if d != axis)
    reduce, combine = _REDUCTIONS[name]
    parts = [reduce(v, axis=inner) if inner else v for v in x.parts]
    if axis in axes:
      total = parts[0]
      for v in parts[1:]:
        total = combine(total, v)
      return [total]
    return [_Steps(parts, axis - sum(d < axis for d in axes))]
  if name == 'slice' and x is not None:
    start, limit = p['start_indices'], p['limit_indices']
    strides = p['strides'] or (1,) * len(start)
    drop = lambda t: tuple(v for d, v in enumerate(t) if d != axis)
    kept = list(range(start[axis], limit[axis], strides[axis]))
    parts = [lax.slice(x.parts[i], drop(start), drop(limit), drop(strides)) for i in kept]
    return [_Steps(parts, axis)]
  if name == 'squeeze' and x is not None:
    dims = tuple(p['dimensions'])
    inner = tuple(d - (d > axis) for d in dims if d != axis)
    parts = [lax.squeeze(v, inner) for v in x.parts]
    if axis in dims:
      return [parts[0]]
    return [_Steps(parts, axis - sum(d < axis for d in dims))]
  if name == 'dot_general' and len(steps) == 1:
    return _dot_general_per_step(eqn, invals, axis)
  if name == 'concatenate' and len(steps) == len(invals) and p['dimension'] != axis:
    d = p['dimension'] - (p['dimension'] > axis)
    return [_Steps([lax.concatenate([s.parts[i] for s in steps], d) for i in range(n)], axis)]
  if name == 'rev' and x is not None and axis in p['dimensions']:
    inner = tuple(d - (d > axis) for d in p['dimensions'] if d != axis)
    return [_Steps([lax.rev(v, inner) if inner else v for v in x.parts[::-1]], axis)]
  return None


def _dot_general_per_step(eqn, invals, axis):
  """A contraction in which the steps' axis is a free axis of one operand."""
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  lhs, rhs = invals
  left = isinstance(lhs, _Steps)
  steps, other = (lhs, rhs) if left else (rhs, lhs)
  c, b = (lc, lb) if left else (rc, rb)
  if axis in c or axis in b:
    return None
  shift = lambda dims: tuple(d - (d > axis) for d in dims)
  dims = ((shift(lc), rc), (shift(lb), rb)) if left else ((lc, shift(rc)), (lb, shift(rb)))
  rank = len(steps.shape)
  free = [d for d in range(rank) if d not in c and d not in b]
  # Output axes: batch, then the lhs free axes, then the rhs free axes.
  lhs_free = len(np.shape(lhs.parts[0] if left else lhs)) + (1 if left else 0) - len(lc) - len(lb)
  out_axis = len(b) + free.index(axis) + (0 if left else lhs_free)
  kw = dict(dimension_numbers=dims, precision=eqn.params.get('precision'),
            preferred_element_type=eqn.params.get('preferred_element_type'))
  parts = [lax.dot_general(v, other, **kw) if left else lax.dot_general(other, v, **kw)
           for v in steps.parts]
  return [_Steps(parts, out_axis)]
