"""Evaluating a jaxpr with its repeated blocks rolled into `lax.scan`.

The kernel computation of a deep network repeats the same equations once per
layer. XLA:CPU compiles a long unrolled program in time that grows faster than
its length, and fuses across layers in ways that recompute work; a scan
compiles the repeated block once and runs it as a loop (DESIGN §5).

`eval_rolled(closed_jaxpr, *args)` evaluates a jaxpr like `jax.core.eval_jaxpr`,
except that each longest run of at least `MIN_REPEATS` identical blocks of
equations (same primitives, parameters and types, literal values aside) runs
as one scan. A block may read values of its own, of the block before it (the
scan carry; the first block reads the corresponding values from before the
run), and values from before the run (the same for every block, or stacked
as scanned inputs when they differ, as literals and per-layer moments do).
Blocks begin at the phase that carries the fewest entries from one block to
the next. Anything else leaves the equations unrolled, so rolling changes the
program's shape, never its values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal

from infwidth.interpreters.compat import bind_equation

#: Fewest repetitions of a block worth a scan.
MIN_REPEATS = 3
#: Fewest equations in a block worth a scan.
MIN_BLOCK = 4
#: Candidate (block length, run) pairs checked per search, largest savings first.
_MAX_CANDIDATES = 32


@dataclasses.dataclass
class _Loop:
  """Equations `start + k·block + q` (k < repeats, q < block) run as a scan."""
  start: int
  block: int
  repeats: int
  # Per equation q of the block, per input: how the k-th block reads it.
  #   ('local', q', j): output j of equation q' of the same block
  #   ('carry', c): carry c (the previous block's value; `inits[c]` for k = 0)
  #   ('const', ref): the same outer variable or literal for every block
  #   ('xs', i): row k of scanned input i (`xs_refs[i]`: one ref per block)
  slots: List[List[Tuple]]
  carries: List[Tuple[int, int]]          # (q, j) whose value the next block reads
  inits: List[Any]                        # outer var or literal per carry
  xs_refs: List[List[Any]]
  ys: List[Tuple[int, int]]               # (q, j) read after the loop: stacked outputs
  # Outer uses: var defined in block k at (q, j) -> ('carry', c) or ('ys', i, k).
  exports: Dict[Any, Tuple]


def _param_key(value):
  if isinstance(value, (ClosedJaxpr, Jaxpr)):
    return ('jaxpr', id(value))
  if isinstance(value, np.ndarray):
    return ('array', value.dtype.str, value.shape, value.tobytes())
  if isinstance(value, (tuple, list)):
    return (type(value).__name__,) + tuple(_param_key(v) for v in value)
  try:
    hash(value)
  except TypeError:
    return ('id', id(value))
  return value


def _aval_key(aval):
  return (type(aval).__name__, tuple(getattr(aval, 'shape', ())),
          str(getattr(aval, 'dtype', '')), bool(getattr(aval, 'weak_type', False)))


def _signature(eqn):
  """What must agree between two equations for one to stand for the other."""
  params = tuple(sorted((k, _param_key(v)) for k, v in eqn.params.items()))
  ins = tuple(('lit' if isinstance(v, Literal) else 'var', _aval_key(v.aval))
              for v in eqn.invars)
  outs = tuple(_aval_key(v.aval) for v in eqn.outvars)
  return (eqn.primitive, params, ins, outs)


def _same_ref(a, b) -> bool:
  if isinstance(a, Literal) or isinstance(b, Literal):
    if not (isinstance(a, Literal) and isinstance(b, Literal)):
      return False
    va, vb = np.asarray(a.val), np.asarray(b.val)
    return va.dtype == vb.dtype and va.shape == vb.shape and bool(np.all(va == vb))
  return a is b


def _runs(codes: np.ndarray, lo: int, hi: int):
  """Candidate `(saved, block, run_start, run_end)`: eqns i and i + block
  have the same signature for run_start <= i < run_end."""
  c = codes[lo:hi]
  out = []
  for block in range(MIN_BLOCK, len(c) // MIN_REPEATS + 1):
    eq = np.concatenate([[False], c[:-block] == c[block:], [False]]).astype(np.int8)
    edges = np.diff(eq)
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    for a, b in zip(starts, ends):
      repeats = (b - a) // block + 1
      if repeats >= MIN_REPEATS:
        out.append(((repeats - 1) * block, block, lo + int(a), lo + int(b)))
  out.sort(key=lambda t: (-t[0], t[1]))
  return out[:_MAX_CANDIDATES]


def _classify(v, k, start, block, defs):
  if isinstance(v, Literal):
    return ('outer', v)
  where = defs.get(v)
  if where is None or where[0] < start:
    return ('outer', v)
  rel = where[0] - (start + k * block)
  if 0 <= rel < block:
    return ('local', rel, where[1])
  if -block <= rel < 0:
    return ('prev', rel + block, where[1])
  return None


def _build(eqns, outvars, start, block, repeats, defs) -> Optional[_Loop]:
  """The scan for this run, or None if some block reads what a scan can't give it."""
  end = start + block * repeats
  slots, carries, inits, carry_index, xs_refs = [], [], [], {}, []
  for q in range(block):
    row = []
    for a in range(len(eqns[start + q].invars)):
      kinds = [_classify(eqns[start + k * block + q].invars[a], k, start, block, defs)
               for k in range(repeats)]
      if any(kd is None for kd in kinds):
        return None
      first = kinds[0]
      if all(kd == first for kd in kinds) and first[0] == 'local':
        row.append(first)
      elif first[0] == 'outer' and all(kd[0] == 'prev' and kd == kinds[1] for kd in kinds[1:]):
        q_src, j = kinds[1][1], kinds[1][2]
        out_aval = eqns[start + q_src].outvars[j].aval
        if tuple(first[1].aval.shape) != tuple(out_aval.shape):
          return None
        key = (q_src, j, id(first[1]))
        if key not in carry_index:
          carry_index[key] = len(carries)
          carries.append((q_src, j))
          inits.append(first[1])
        row.append(('carry', carry_index[key]))
      elif all(kd[0] == 'outer' for kd in kinds):
        refs = [kd[1] for kd in kinds]
        if all(_same_ref(r, refs[0]) for r in refs[1:]):
          row.append(('const', refs[0]))
        else:
          row.append(('xs', len(xs_refs)))
          xs_refs.append(refs)
      else:
        return None
    slots.append(row)

  # Values of the run read after it: the last block's carried values come
  # from the final carry, anything else from stacked outputs.
  used_after = set()
  for eqn in eqns[end:]:
    used_after.update(v for v in eqn.invars if not isinstance(v, Literal))
  used_after.update(v for v in outvars if not isinstance(v, Literal))
  carried = {c: i for i, c in enumerate(carries)}
  ys, ys_index, exports = [], {}, {}
  for i in range(start, end):
    for j, v in enumerate(eqns[i].outvars):
      if v not in used_after:
        continue
      k, q = divmod(i - start, block)
      if k == repeats - 1 and (q, j) in carried:
        exports[v] = ('carry', carried[(q, j)])
      else:
        if (q, j) not in ys_index:
          ys_index[(q, j)] = len(ys)
          ys.append((q, j))
        exports[v] = ('ys', ys_index[(q, j)], k)
  return _Loop(start, block, repeats, slots, carries, inits, xs_refs, ys, exports)


def _carried_size(eqns, start, block, defs) -> int:
  """Entries that block 1 of a run starting at `start` reads from block 0."""
  carried = set()
  for eqn in eqns[start + block:start + 2 * block]:
    for v in eqn.invars:
      where = None if isinstance(v, Literal) else defs.get(v)
      if where is not None and start <= where[0] < start + block:
        carried.add(where)
  return sum(int(np.prod(eqns[i].outvars[j].aval.shape)) for i, j in carried)


def plan_loops(jaxpr: Jaxpr) -> List[_Loop]:
  """The runs of `jaxpr`'s top-level equations to evaluate as scans."""
  eqns = jaxpr.eqns
  if jaxpr.effects or len(eqns) < MIN_BLOCK * MIN_REPEATS:
    return []
  codes_of: Dict[Any, int] = {}
  codes = np.array([codes_of.setdefault(_signature(e), len(codes_of)) for e in eqns])
  defs = {v: (i, j) for i, e in enumerate(eqns) for j, v in enumerate(e.outvars)
          if not isinstance(v, DropVar)}
  loops: List[_Loop] = []
  todo = [(0, len(eqns))]
  while todo:
    lo, hi = todo.pop()
    for _, block, a, b in _runs(codes, lo, hi):
      # The phase at which blocks begin: fewest bytes carried from one block
      # to the next first (less state to materialise and copy per step:
      # measured 20-30 % faster on a deep CNN's kernel than the first phase).
      phases = []
      for start in range(a, a + block):
        repeats = (b + block - start) // block
        if repeats >= MIN_REPEATS:
          phases.append((_carried_size(eqns, start, block, defs), -repeats, start))
      found = None
      for _, neg_repeats, start in sorted(phases):
        found = _build(eqns, jaxpr.outvars, start, block, -neg_repeats, defs)
        if found is not None:
          break
      if found is not None:
        loops.append(found)
        todo += [(lo, found.start), (found.start + found.block * found.repeats, hi)]
        break
  return sorted(loops, key=lambda l: l.start)


def eval_rolled(closed: ClosedJaxpr, *args) -> List[Any]:
  """`jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)`, repeated blocks as scans."""
  jaxpr = closed.jaxpr
  env: Dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, Literal) else env[v]

  def write(vs, vals):
    for v, x in zip(vs, vals):
      if not isinstance(v, DropVar):
        env[v] = x

  write(jaxpr.constvars, closed.consts)
  write(jaxpr.invars, args)
  loops = {l.start: l for l in plan_loops(jaxpr)}
  i = 0
  while i < len(jaxpr.eqns):
    loop = loops.get(i)
    if loop is None:
      eqn = jaxpr.eqns[i]
      write(eqn.outvars, bind_equation(eqn, [read(v) for v in eqn.invars]))
      i += 1
      continue
    _run_loop(jaxpr.eqns, loop, read, env)
    i += loop.block * loop.repeats
  return [read(v) for v in jaxpr.outvars]


def _as_aval(x, aval):
  return jnp.broadcast_to(jnp.asarray(x, aval.dtype), aval.shape)


def _run_loop(eqns, loop: _Loop, read, env):
  block_eqns = eqns[loop.start:loop.start + loop.block]
  init = [_as_aval(read(v), block_eqns[q].outvars[j].aval)
          for v, (q, j) in zip(loop.inits, loop.carries)]
  xs = [jnp.stack([_as_aval(read(r), r.aval) for r in refs]) for refs in loop.xs_refs]

  def body(carry, xs_k):
    local = {}
    for q, eqn in enumerate(block_eqns):
      ins = []
      for slot in loop.slots[q]:
        kind = slot[0]
        if kind == 'local':
          ins.append(local[slot[1:]])
        elif kind == 'carry':
          ins.append(carry[slot[1]])
        elif kind == 'const':
          ins.append(read(slot[1]))
        else:
          ins.append(xs_k[slot[1]])
      for j, x in enumerate(bind_equation(eqn, ins)):
        local[(q, j)] = x
    new_carry = [jnp.asarray(local[c], init[n].dtype) for n, c in enumerate(loop.carries)]
    return new_carry, [local[y] for y in loop.ys]

  final, ys = lax.scan(body, init, xs, length=loop.repeats)
  for v, where in loop.exports.items():
    env[v] = final[where[1]] if where[0] == 'carry' else ys[where[1]][where[2]]
