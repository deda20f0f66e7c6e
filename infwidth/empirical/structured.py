"""Structured-derivative empirical NTK: a jaxpr interpreter.

For a parameter `w` used by a primitive `y = prim(a, v)`, `v = L(w)`, the
NTK contribution is `Θ = (∂f/∂y · ∂y/∂v · L)(∂f/∂y · ∂y/∂v · L)ᵀ` (Novak et al.
2022, eq. 3). `L` is a chain of permutations and scalings (reshape,
transpose, casts, `neg`, multiplication by a scalar), so `L Lᵀ = c² I` and the
contraction happens in `v`'s space. The Jacobian `∂y/∂v` is never built:

* `dot_general`, `y = a·v`: `∂y/∂v = a ⊗ I`, so
  `Θ = Σ df1[o1, l1, r] (a1 a2ᵀ)[l1, l2] df2[o2, l2, r]` (eq. 9).
* `conv_general_dilated` w.r.t. its filter: the same with `a` the input's
  patches (a convolution is a `dot_general` with its patches).
* `gather` (embedding lookups) w.r.t. its operand: `∂y/∂v` is a selection, so
  `Θ = Σ df1[o1, p1, d] [m1(p1) = m2(p2)] df2[o2, p2, d]`, with `m` the row each
  position reads; nothing of the operand's size is built (NT #199).

Elementwise uses (biases, scales, LayerNorm) have diagonal Jacobians: their
`J = ∂f/∂w` is no larger than `∂f/∂y`, and is contracted directly, as is any
parameter used by another primitive (the fallback). `df/dy` for every site
comes from one reverse pass with a zero perturbation added to each site's
output. The order of each contraction is chosen by `opt_einsum`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from infwidth.empirical import _utils
from infwidth.rules import builtin as _builtin  # noqa: F401  (registers the facts)
from infwidth.rules.registry import fact
from infwidth.interpreters.flat_program import Lit as _Lit, Op as _Op, Program as _Program
from infwidth.interpreters.flat_program import flatten as _flatten, run as _run
from infwidth.interpreters.walker import trace as _trace

# ANALYSIS: where does each parameter enter?


@dataclasses.dataclass(frozen=True)
class _Site:
  """A use `prim(..., v, ...)` of `v = c·L(w)`, `w` a parameter leaf."""
  op: int
  pos: int
  kind: str                        # 'dot', 'conv' or 'gather'
  chain: Tuple[Any, ...]           # `L`, compared by primitive and params
  scales: Tuple[Tuple[Any, str], ...]  # factors of `c`: (atom, 'mul'|'div')


def _freeze(params: Dict[str, Any]) -> Tuple[Any, ...]:
  return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _shape(prog: _Program, atom) -> Tuple[int, ...]:
  return np.shape(atom.val) if isinstance(atom, _Lit) else prog.avals[atom].shape


def _chain_step(prog, op, lin_ins, lin):
  """The chain `(leaf, L, scales)` of `op`'s output, or None if not a chain."""
  if len(lin_ins) != 1:
    return None
  pos, (leaf, chain, scales) = lin_ins[0]
  prim = op.prim
  role = fact(prim, 'structured')
  if role == 'permutation':
    if prim is P.convert_element_type_p and not jnp.issubdtype(
        op.params['new_dtype'], jnp.inexact):
      return None
    if prim is P.broadcast_in_dim_p and (
        np.prod(prog.avals[op.outs[0]].shape) != np.prod(_shape(prog, op.ins[0]))
        or len(op.ins) != 1):
      return None
    return leaf, chain + ((prim, _freeze(op.params)),), scales
  if role == 'scale' and len(op.ins) == 1:  # neg
    return leaf, chain, scales + ((_Lit(-1.), 'mul'),)
  if role == 'scale' and len(op.ins) == 2:
    other = op.ins[1 - pos]
    if _shape(prog, other) != () or (prim is P.div_p and pos != 0):
      return None
    return leaf, chain, scales + ((other, 'mul' if prim is P.mul_p else 'div'),)
  return None


def _site_kind(op: _Op, pos: int) -> Optional[str]:
  """'dot', 'conv' or 'gather' where operand `pos` of `op` is a site whose
  Jacobian is contracted without being built (the registered fact)."""
  kind = fact(op.prim, 'structured')
  if kind == 'dot':
    return kind
  if kind == 'conv':
    if (pos == 1 and op.params['feature_group_count'] == 1
        and op.params['batch_group_count'] == 1):
      return kind
    return None
  if kind == 'gather' and pos == 0:
    dn = op.params['dimension_numbers']
    if not getattr(dn, 'operand_batching_dims', ()):
      return kind
  return None


def _analyse(prog: _Program, leaf_ids: Dict[int, int]):
  """Sites of each leaf, and leaves whose Jacobian must be built (dense)."""
  lin = {i: (leaf, (), ()) for i, leaf in leaf_ids.items()}
  sites: Dict[int, List[_Site]] = {}
  dense = set()
  for n, op in enumerate(prog.ops):
    lin_ins = [(p, lin[a]) for p, a in enumerate(op.ins)
               if not isinstance(a, _Lit) and a in lin]
    if not lin_ins:
      continue
    step = _chain_step(prog, op, lin_ins, lin)
    if step is not None:
      lin[op.outs[0]] = step
      continue
    for p, (leaf, chain, scales) in lin_ins:
      kind = _site_kind(op, p)
      if kind is None:
        dense.add(leaf)
      else:
        sites.setdefault(leaf, []).append(_Site(n, p, kind, chain, scales))
  for a in prog.out_atoms:
    if not isinstance(a, _Lit) and a in lin:
      dense.add(lin[a][0])
  return sites, dense


# PER-SIDE FACTORS


def _scale_value(site: _Site, env) -> Any:
  c = 1.
  for atom, how in site.scales:
    v = atom.val if isinstance(atom, _Lit) else env[atom]
    c = c * v if how == 'mul' else c / v
  return c


def _conv_patches(lhs: jax.Array, op: _Op, rhs_shape, out_shape) -> jax.Array:
  """Patches `P[n, i, k..., s...] = lhs_padded[n, i, s·stride + k·dilation]`."""
  p = op.params
  lhs_spec, rhs_spec, out_spec = p['dimension_numbers']
  lhs = jnp.transpose(lhs, lhs_spec)  # (N, C, spatial...)
  nsp = lhs.ndim - 2
  lhs_dil = p['lhs_dilation'] or (1,) * nsp
  rhs_dil = p['rhs_dilation'] or (1,) * nsp
  pads = [(0, 0, 0), (0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in
                                    zip(p['padding'], lhs_dil)]
  lhs = lax.pad(lhs, jnp.zeros((), lhs.dtype), pads)
  ks = [rhs_shape[d] for d in rhs_spec[2:]]
  outs = [out_shape[d] for d in out_spec[2:]]
  strides = p['window_strides']
  slices = []
  for k in itertools.product(*map(range, ks)):
    start = [0, 0] + [ki * di for ki, di in zip(k, rhs_dil)]
    limit = list(lhs.shape[:2]) + [
        s + (o - 1) * st + 1 for s, o, st in zip(start[2:], outs, strides)]
    slices.append(lax.slice(lhs, start, limit, (1, 1) + tuple(strides)))
  patches = jnp.stack(slices, axis=2)  # (N, C, K, spatial...)
  return patches.reshape(patches.shape[:2] + tuple(ks) + patches.shape[3:])


def _gather_map(op: _Op, operand_shape, indices) -> jax.Array:
  """`m[p]`: 1 + the operand row read at each position (0 where dropped).

  Rows are the operand's coordinates outside its full-slice axes; the result
  keeps only the positions (output axes that are not full-slice axes).
  """
  dn = op.params['dimension_numbers']
  full = _gather_full_axes(op, operand_shape)
  row_shape = [1 if a in full else s for a, s in enumerate(operand_shape)]
  rows = jnp.arange(1, int(np.prod(row_shape)) + 1, dtype=jnp.int32)
  rows = rows.reshape(row_shape)  # full axes have size 1, sliced whole
  sizes = tuple(1 if a in full else s
                for a, s in enumerate(op.params['slice_sizes']))
  m = lax.gather(rows, indices, dn, sizes, mode=op.params['mode'],
                 fill_value=0)
  offset_of = _gather_offset_axes(op, operand_shape)
  drop = [y for y, a in offset_of.items() if a in full]
  return m[tuple(0 if d in drop else slice(None) for d in range(m.ndim))]


def _gather_offset_axes(op: _Op, operand_shape) -> Dict[int, int]:
  """Output offset axis -> operand axis."""
  dn = op.params['dimension_numbers']
  kept = [a for a in range(len(operand_shape))
          if a not in dn.collapsed_slice_dims]
  return dict(zip(dn.offset_dims, kept))


def _gather_full_axes(op: _Op, operand_shape) -> set:
  """Operand axes sliced whole, at offset 0: shared by all positions."""
  dn = op.params['dimension_numbers']
  return {a for a in range(len(operand_shape))
          if a not in dn.collapsed_slice_dims and a not in dn.start_index_map
          and op.params['slice_sizes'][a] == operand_shape[a]}


def _capture(prog: _Program, site: _Site, env) -> Dict[str, jax.Array]:
  """The primal data a site's contraction needs."""
  op = prog.ops[site.op]
  read = lambda a: a.val if isinstance(a, _Lit) else env[a]
  scale = jnp.asarray(_scale_value(site, env))
  if site.kind == 'dot':
    return dict(a=read(op.ins[1 - site.pos]) * scale)
  if site.kind == 'conv':
    lhs = read(op.ins[0]) * scale
    return dict(a=_conv_patches(lhs, op, _shape(prog, op.ins[1]),
                                prog.avals[op.outs[0]].shape))
  m = _gather_map(op, _shape(prog, op.ins[0]), read(op.ins[1]))
  return dict(m=m, scale=scale)


@dataclasses.dataclass
class _Plan:
  prog: _Program
  sites: Dict[int, List[_Site]]   # structured leaves only
  dense: List[int]                # leaves contracted through their Jacobian


def _side_factors(plan: _Plan, leaves, x, kw_arrays):
  """`df/dy` per site op, site data, and Jacobians of dense leaves."""
  prog = plan.prog
  inputs = list(leaves) + jax.tree.leaves((x, kw_arrays))
  site_ops = sorted({s.op for ss in plan.sites.values() for s in ss})
  eps0 = {i: jnp.zeros(prog.avals[prog.ops[i].outs[0]].shape,
                       prog.avals[prog.ops[i].outs[0]].dtype) for i in site_ops}
  dense0 = [leaves[i] for i in plan.dense]

  def g(eps, dense_vals):
    ins = list(inputs)
    for i, v in zip(plan.dense, dense_vals):
      ins[i] = v
    outs, env = _run(prog, ins, eps)
    aux = {(leaf, j): _capture(prog, s, env)
           for leaf, ss in plan.sites.items() for j, s in enumerate(ss)}
    return outs, aux

  outs, vjp, aux = jax.vjp(g, eps0, dense0, has_aux=True)
  df, jac = jax.vmap(vjp)(_utils.std_basis(outs))
  aux = jax.tree.map(jax.lax.stop_gradient, aux)
  return df, jac, aux, [o.shape for o in outs]


# CONTRACTION


def _dot_letters(op: _Op, pos: int, v_letters, letters):
  """Letters of `y` and of the other operand `a`, given those of `v`."""
  (lc, rc), (lb, rb) = op.params['dimension_numbers']
  shapes_nd = (len(op.eqn.invars[0].aval.shape),
               len(op.eqn.invars[1].aval.shape))
  contract = (lc, rc)
  batch = (lb, rb)
  v_nd, a_nd = shapes_nd[pos], shapes_nd[1 - pos]
  a_letters = [None] * a_nd
  for va, aa in zip(contract[pos], contract[1 - pos]):
    a_letters[aa] = v_letters[va]
  for va, aa in zip(batch[pos], batch[1 - pos]):
    a_letters[aa] = v_letters[va]
  y_batch = [v_letters[va] for va in batch[pos]]
  free = lambda nd, c, b: [d for d in range(nd) if d not in c and d not in b]
  v_free = [v_letters[d] for d in free(v_nd, contract[pos], batch[pos])]
  a_free_dims = free(a_nd, contract[1 - pos], batch[1 - pos])
  a_free = letters(len(a_free_dims))
  for d, l in zip(a_free_dims, a_free):
    a_letters[d] = l
  y = y_batch + (a_free + v_free if pos == 1 else v_free + a_free)
  return y, a_letters


def _conv_letters(op: _Op, v_letters, letters):
  lhs_spec, rhs_spec, out_spec = op.params['dimension_numbers']
  nsp = len(rhs_spec) - 2
  n, = letters()
  spatial = letters(nsp)
  a_letters = [n, v_letters[rhs_spec[1]]] + [v_letters[d] for d in rhs_spec[2:]]
  a_letters += spatial
  y = [None] * len(out_spec)
  y[out_spec[0]] = n
  y[out_spec[1]] = v_letters[rhs_spec[0]]
  for d, l in zip(out_spec[2:], spatial):
    y[d] = l
  return y, a_letters


def _gather_letters(prog, op: _Op, v_letters, letters):
  """Letters of `y` and of the positions (non-full-slice output axes)."""
  operand_shape = _shape(prog, op.ins[0])
  full = _gather_full_axes(op, operand_shape)
  offset_of = _gather_offset_axes(op, operand_shape)
  y, pos = [], []
  for d in range(len(prog.avals[op.outs[0]].shape)):
    if d in offset_of and offset_of[d] in full:
      y.append(v_letters[offset_of[d]])
    else:
      (l,) = letters()
      y.append(l)
      pos.append(l)
  return y, pos


def _site_pair(prog1, prog2, s1, s2, side1, side2, o1, o2, b1, b2,
               out, letters):
  """`Σ_v G1[o1, v] G2[o2, v]` for two sites of one leaf (same kind, same L)."""
  df1, aux1 = side1
  df2, aux2 = side2
  op1, op2 = prog1.ops[s1.op], prog2.ops[s2.op]
  v = letters(len(_shape(prog1, op1.ins[s1.pos])))
  if s1.kind == 'gather':
    y1, p1 = _gather_letters(prog1, op1, v, letters)
    y2, p2 = _gather_letters(prog2, op2, v, letters)
    m1, m2 = aux1['m'], aux2['m']
    eq = (m1.reshape(m1.shape + (1,) * m2.ndim) == m2) & (
        m1.reshape(m1.shape + (1,) * m2.ndim) > 0)
    eq = eq.astype(df1.dtype)
    return _utils.einsum(df1, o1 + y1, eq, b1 + p1 + b2 + p2, df2, o2 + y2,
                         aux1['scale'], b1, aux2['scale'], b2, out=out)
  if s1.kind == 'dot':
    y1, a1 = _dot_letters(op1, s1.pos, v, letters)
    y2, a2 = _dot_letters(op2, s2.pos, v, letters)
  else:
    y1, a1 = _conv_letters(op1, v, letters)
    y2, a2 = _conv_letters(op2, v, letters)
  return _utils.einsum(df1, o1 + y1, aux1['a'], b1 + a1, aux2['a'], b2 + a2,
                       df2, o2 + y2, out=out)


def _trace_program(g, leaves, treedef, static_kw, x_struct, kw_struct):
  def flat(leaves, x, kw):
    return jax.tree.leaves(g(jax.tree.unflatten(treedef, leaves), x,
                             **static_kw, **kw))
  closed = _trace(flat, leaves, x_struct, kw_struct)
  return _flatten(closed)


def _example_struct(tree, axes):
  """Shape-dtype structs of one example (the batch axis removed)."""
  def one(a, ax):
    shape = tuple(np.shape(a))
    if ax is not None:
      shape = shape[:ax] + shape[ax + 1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(a))
  if axes is None:
    return jax.tree.map(lambda a: one(a, None), tree)
  return jax.tree.map(one, tree, axes)


def structured_ntk(s, trace_axes, diagonal_axes) -> List[jax.Array]:
  """The NTK of each output of `s.f` by structured derivatives.

  Args:
    s: the call's `ntk._Setup`.
    trace_axes, diagonal_axes: as in `empirical_ntk_fn`.

  Returns:
    One kernel per output leaf, in NT layout.
  """
  g = s.side_fn()
  x2 = s.x1 if s.x2 is None else s.x2
  sides = [(s.x1, s.kw1)] if s.x2 is None else [(s.x1, s.kw1), (x2, s.kw2)]
  split = []
  for x, kw in sides:
    arr = {k: v for k, v in kw.items()
           if jax.tree.leaves(v) and all(hasattr(l, 'shape')
                                         for l in jax.tree.leaves(v))}
    static = {k: v for k, v in kw.items() if k not in arr}
    split.append((x, arr, static))

  progs = []
  for x, arr, static in split:
    if s.vmapped:
      xs = _example_struct(x, s.x_axis)
      ks = {k: _example_struct(v, jax.tree.map(lambda _: s.kw_axes[k], v)
                               if k in s.kw_axes else None)
            for k, v in arr.items()}
    else:
      xs, ks = _example_struct(x, None), _example_struct(arr, None)
    progs.append(_trace_program(g, s.leaves, s.treedef, static, xs, ks))

  # One decision per leaf for both sides: structured only if every use on
  # both sides is a site of one kind through one chain `L`.
  leaf_ids = [{p.in_ids[i]: i for i in s.active} for p in progs]
  analyses = [_analyse(p, ids) for p, ids in zip(progs, leaf_ids)]
  dense = set().union(*[d for _, d in analyses])
  structured = set()
  for leaf in s.active:
    if leaf in dense:
      continue
    uses = [(site.kind, site.chain) for sites, _ in analyses
            for site in sites.get(leaf, [])]
    if not uses:
      continue  # unused: contributes nothing
    if len(set(uses)) == 1:
      structured.add(leaf)
    else:
      dense.add(leaf)
  plans = [_Plan(p, {l: ss for l, ss in sites.items() if l in structured},
                 sorted(dense)) for p, (sites, _) in zip(progs, analyses)]

  factors = []
  for plan, (x, arr, _) in zip(plans, split):
    fn = lambda x, kw, plan=plan: _side_factors(plan, s.leaves, x, kw)
    if s.vmapped:
      in_x, in_kw = _utils.vmap_in_axes(s.x_axis, s.kw_axes, arr)
      df, jac, aux, _ = jax.vmap(fn, in_axes=(in_x, in_kw))(x, arr)
    else:
      df, jac, aux, _ = fn(x, arr)
    factors.append((df, jac, aux))
  if len(factors) == 1:
    factors.append(factors[0])
    plans.append(plans[0])

  out = []
  for k, (fx1, fx2) in enumerate(zip(s.out_leaves1, s.out_leaves2)):
    shapes1, shapes2 = ([o.shape for o in s.out_leaves1],
                        [o.shape for o in s.out_leaves2])
    if s.vmapped:
      shapes1 = [_drop(sh, ax) for sh, ax in zip(shapes1, s.fx_axes)]
      shapes2 = [_drop(sh, ax) for sh, ax in zip(shapes2, s.fx_axes)]

    def rows(a, shapes):
      """This output's rows of a basis-indexed array, in output layout."""
      if s.vmapped:
        a = jnp.moveaxis(a, 0, 1)  # (O, N, ...)
        a = _utils.split_rows(a, shapes)[k]  # (*o_ex, N, ...)
        return jnp.moveaxis(a, len(shapes[k]), s.fx_axes[k])
      return _utils.split_rows(a, shapes)[k]

    ntk = jnp.zeros(_utils.kernel_shape(fx1.shape, fx2.shape, trace_axes,
                                        diagonal_axes), s.dtype)
    (df1, jac1, aux1), (df2, jac2, aux2) = factors
    p1, p2 = plans
    for j, leaf in enumerate(p1.dense):
      lets = _utils.Letters()
      l1, l2, lo = _utils.output_letters(len(fx1.shape), trace_axes,
                                         diagonal_axes, lets)
      p = lets(s.leaves[leaf].ndim)
      term = _utils.einsum(rows(jac1[j], shapes1), l1 + p,
                           rows(jac2[j], shapes2), l2 + p, out=lo)
      ntk = ntk + _scale(s.weights[leaf], term)
    for leaf in sorted(p1.sites):
      term = 0.
      for i1, s1 in enumerate(p1.sites[leaf]):
        for i2, s2 in enumerate(p2.sites[leaf]):
          lets = _utils.Letters()
          l1, l2, lo = _utils.output_letters(len(fx1.shape), trace_axes,
                                             diagonal_axes, lets)
          c1 = [l1[s.fx_axes[k]]] if s.vmapped else []
          c2 = [l2[s.fx_axes[k]]] if s.vmapped else []
          term = term + _site_pair(
              p1.prog, p2.prog, s1, s2,
              (rows(df1[s1.op], shapes1), aux1[(leaf, i1)]),
              (rows(df2[s2.op], shapes2), aux2[(leaf, i2)]),
              l1, l2, c1, c2, lo, lets)
      ntk = ntk + _scale(s.weights[leaf], term)
    size = _utils.size_at(fx1.shape, _utils.canonicalize_axes(
        trace_axes, len(fx1.shape)))
    out.append(ntk / size)
  return out


def _drop(shape, ax):
  return tuple(shape[:ax]) + tuple(shape[ax + 1:])


def _scale(w, k):
  return k if isinstance(w, (int, float)) and w == 1 else w * k
