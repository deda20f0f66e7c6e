"""Value helpers shared by the rules: parameter views, conversion between a
value's axes and the canonical `(B, *S)` layout, sums and products of wide
values (collapsing into one elementwise chain: `infwidth.domain.collapse`)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import values as A
from infwidth.domain.values import Det
from infwidth.domain.errors import InternalError, UnsupportedValueError
from infwidth.domain.chain import Chain, ChainBuilder, U, const
from infwidth.domain.params import SAMPLING_ERROR_WARN
from infwidth.domain.collapse import (A_arg, NotGaussian, SeveralGaussians, collapse,  # noqa: F401
                                      finish_term)


def merge_roles(shape, *operands) -> Tuple[Any, ...]:
  """Per-axis roles of an elementwise result: the first non-None role of an
  operand whose size matches."""
  out = []
  for i, n in enumerate(shape):
    role = None
    for v in operands:
      r = getattr(v, 'roles', None)
      if r is None or len(r) != len(shape):
        continue
      if r[i] is not None and (v.shape[i] == n or r[i] == 'c'):
        role = r[i]
        break
    out.append(role)
  return tuple(out)


def det_to_canonical(d: Det, roles: Sequence[Any], what: str = 'a deterministic operand',
                     shape: Optional[Sequence[int]] = None):
  """Puts a `Det` aligned with a wide value of `roles` (and `shape`) into
  canonical `(B|1, *S|1)` layout; a `ChannelArray` where it varies along the
  channel axis alone (a per-channel array with distinct entries)."""
  # Concrete values stay NumPy so that constants stay static under jit.
  value = d.value if d.compact is None else d.compact
  xp = jnp if isinstance(value, jax.core.Tracer) else np
  v = xp.asarray(value)
  n_spatial = sum(r not in ('b', 'c', None) for r in roles)
  if v.ndim == 0:
    return v.reshape((1,) * (1 + n_spatial))
  if v.ndim != len(roles):
    raise InternalError(f'{what} of rank {v.ndim} against a value of rank {len(roles)}')
  per_channel = False
  for i, r in enumerate(roles):
    if v.shape[i] == 1:
      continue
    if r == 'c':
      # A constant array along the channel axis (a per-channel array whose
      # entries are all equal: BatchNorm's initial statistics) is its value.
      first = None if xp is jnp else np.take(v, [0], axis=i)
      if first is not None and np.all(v == first):
        v = first
      else:
        per_channel = True
      continue
    if r is None:
      # The wide value is the same along this axis (a bias broadcast over a
      # batch-sized axis); so must the deterministic operand be (an array
      # built from shapes, such as an RNN's zero state).
      first = None if xp is jnp else np.take(v, [0], axis=i)
      if first is None or not np.all(v == first):
        raise UnsupportedValueError(
            f'{what} varies along axis {i}, along which the wide value it meets is constant '
            '(no batch axis); cannot tell its layout.')
      v = first
      continue
    if d.roles[i] != r and d.roles[i] is not None:
      raise InternalError(f'axis {i} of {what} has role {d.roles[i]}, expected {r}')
  if per_channel:
    return _channel_array(v, roles, what, shape)
  spatial = [i for i, r in enumerate(roles) if r not in ('b', 'c', None)]
  b = [i for i, r in enumerate(roles) if r == 'b']
  perm = b + spatial + [i for i in range(len(roles)) if i not in b + spatial]
  v = xp.transpose(v, perm)
  keep = len(b) + len(spatial)
  v = v.reshape(v.shape[:keep])
  if not b:
    v = v[None]
  return v


def _channel_array(v, roles, what, shape) -> A.ChannelArray:
  """A per-channel array with distinct entries (`v` varies along a channel
  axis of a wide value of `roles`): its entries, one per channel, flattened
  over the channel axes in order. It must not vary along any other axis."""
  concrete = not isinstance(v, jax.core.Tracer)
  for i, r in enumerate(roles):
    if r == 'c' or v.shape[i] == 1:
      continue
    first = np.take(v, [0], axis=i) if concrete else None
    if first is None or not np.all(v == first):
      raise UnsupportedValueError(
          f'{what} varies along the channel (wide) axis and along the '
          f'{"batch" if r == "b" else "spatial" if r is not None else "size-one"} axis {i}: '
          'a deterministic array that depends on the input and the channel has no '
          'infinite-width limit here; per-channel arrays (the same for every input and '
          'position, e.g. BatchNorm statistics) are supported.')
    v = first
  channels = [i for i, r in enumerate(roles) if r == 'c']
  full = tuple(shape[i] if shape is not None else v.shape[i] for i in channels)
  v = v.reshape(tuple(v.shape[i] for i in channels))
  values = (np.broadcast_to(v, full) if concrete else jnp.broadcast_to(v, full)).reshape(-1)
  if concrete:
    values = np.asarray(values)
    warn_channel_sample(values.shape[0])
  return A.ChannelArray(values)


def warn_channel_sample(n: int) -> None:
  """The small-sample warning of estimated parameter moments (DESIGN §3),
  for a per-channel array: its `n` entries stand for the channel
  distribution of the wider network, a sample with relative error about
  `√(2/n)` (as a Gaussian leaf's variance estimated from `n` entries)."""
  err = math.sqrt(2.0 / max(n, 1))
  if err > SAMPLING_ERROR_WARN:
    warnings.warn(
        f'per-channel array of {n} channels (e.g. BatchNorm statistics): its entries are '
        'taken as a sample of the channel distribution of the infinite-width network, a '
        f'sample error of about ±{100 * err:.1f}% on averages over channels.', stacklevel=2)


def canonical_to_value(arr, roles: Sequence[Any], shape: Sequence[int]):
  """Inverse of `det_to_canonical` for a result without channel axis: `(B, *S)` → value layout."""
  arr = jnp.asarray(arr)
  b = [i for i, r in enumerate(roles) if r == 'b']
  spatial = [i for i, r in enumerate(roles) if r not in ('b', 'c', None)]
  order = b + spatial
  if not b:
    arr = arr[0]
  # arr axes follow `order`; place them at their positions, size-1 elsewhere.
  inv = sorted(range(len(order)), key=lambda k: order[k])
  arr = jnp.transpose(arr, inv) if order else arr
  full = [shape[i] if i in order else 1 for i in range(len(roles))]
  return jnp.broadcast_to(arr.reshape(full), tuple(shape))


def param_to_wide(p: A.ParamRef, roles=()) -> A.Wide:
  """A parameter used elementwise: a Gaussian source along its only non-trivial
  axis, or along several where the value it meets (of axis `roles`) has
  channel axes there (a `(heads, head_dim)` bias)."""
  from_leaf = [i for i, a in enumerate(p.axes) if a is not None]
  big = [i for i in from_leaf if p.shape[i] != 1] or from_leaf[-1:]
  several_channels = (len(roles) == len(p.shape) and len(big) > 1
                      and all(roles[i] == 'c' for i in big))
  if len(big) > 1 and not several_channels:
    raise UnsupportedValueError(
        f'parameter {p.leaf.name!r} of shape {p.leaf.shape} is used elementwise with '
        f'{len(big)} non-trivial axes; only per-channel vectors (biases, scales) are '
        'supported elementwise.')
  if not big:
    raise UnsupportedValueError(
        f'parameter {p.leaf.name!r} is a scalar shared by all channels, so channels '
        'are not independent; pass it as a constant (closed over) instead.')
  roles = tuple('c' if i in big else None for i in range(len(p.shape)))
  src = A.ParamSource(p)
  return A.Wide(tuple(p.shape), roles, (A.Term(Chain(), A.combo_of(src, ())),))


def relayout(w: A.Wide, roles: Tuple[Any, ...], shape: Tuple[int, ...], hidden=None) -> A.Wide:
  """Re-expresses `w` (broadcast to `shape`) with axis roles `roles` (and, for a
  Flatten, the spatial axes `hidden` merged into its channel axis)."""
  hidden = w.hidden if hidden is None else tuple(hidden)
  if tuple(w.roles) == tuple(roles) and hidden == w.hidden:
    return dataclasses.replace(w, shape=tuple(shape))
  src = w.spatial
  dst = tuple(r for r in roles if r not in ('b', 'c', None)) + tuple(r for r, _ in hidden)

  def fix(arr):
    if isinstance(arr, (float, A.ChannelArray)):  # a channel array broadcasts as a scalar
      return arr
    return A.align(arr, src, dst)

  def fix_combo(c):
    return A.Combo(c.sources, tuple(fix(k) for k in c.coefs), dst, fix(c.mean))

  def fix_term(t):
    return A.Term(t.chain, fix_combo(t.combo), tuple(fix_combo(p) for p in t.pargs),
                  tuple(fix(d) for d in t.dargs), t.factors,
                  tuple(fix_term(f) for f in t.cofactors), tuple(fix_combo(g) for g in t.gargs))

  terms = [fix_term(t) for t in w.terms]
  off = None if w.offset is None else fix(w.offset)
  return A.Wide(tuple(shape), tuple(roles), tuple(terms), off, hidden)


def map_terms_scale(w: A.Wide, c) -> A.Wide:
  """`c · w` for a float or canonical-layout array `c`."""
  terms = []
  for t in w.terms:
    if t.is_gaussian:
      terms.append(dataclasses.replace(t, combo=A.scale_combo(t.combo, c)))
    else:
      b = ChainBuilder(t.chain.n_args)
      out = b.inline(t.chain, U, [A_arg(i) for i in range(t.chain.n_args)])
      if isinstance(c, float):
        out = b.binary('mul', *(out, const(c)))
        terms.append(dataclasses.replace(t, chain=b.build(out)))
      else:
        out = b.binary('mul', *(out, b.new_arg()))
        terms.append(dataclasses.replace(t, chain=b.build(out), dargs=t.dargs + (c,)))
  off = None if w.offset is None else A._mul(c, w.offset)
  return A.Wide(w.shape, w.roles, tuple(terms), off, w.hidden)


def add_wides(a: A.Wide, b: A.Wide, sign: float = 1.0) -> A.Wide:
  """`a + sign·b` for two wide values already in the same layout."""
  if sign != 1.0:
    b = map_terms_scale(b, sign)
  gauss = [t for t in a.terms + b.terms if t.is_gaussian]
  other = [t for t in a.terms + b.terms if not t.is_gaussian]
  terms = []
  if gauss:
    combo = gauss[0].combo
    for t in gauss[1:]:
      combo = A.add_combos(combo, t.combo)
    terms.append(A.Term(Chain(), combo))
  terms += other
  off = a.offset if b.offset is None else (b.offset if a.offset is None else a.offset + b.offset)
  return A.Wide(a.shape, a.roles, tuple(terms), off, a.hidden)


def add_offset(w: A.Wide, c) -> A.Wide:
  """`w + c` for a deterministic `c`. A per-channel array joins the mean of a
  Gaussian term where there is one, so that a nonlinearity after it sees a
  non-centred Gaussian (closed forms for the ReLU family) rather than a
  shifted chain."""
  if isinstance(c, A.ChannelArray):
    for k, t in enumerate(w.terms):
      if t.is_gaussian:
        terms = list(w.terms)
        terms[k] = dataclasses.replace(t, combo=A.scale_combo(t.combo, 1.0, c))
        return A.Wide(w.shape, w.roles, tuple(terms), w.offset, w.hidden)
  off = c if w.offset is None else w.offset + c
  return A.Wide(w.shape, w.roles, w.terms, off, w.hidden)


def multiply_independent(a: A.Wide, b: A.Wide) -> A.Wide:
  """`a · b` for wide values in the same layout whose terms are pairwise
  independent: each product of terms is one term with cofactors.

  Raises:
    SeveralGaussians: if a term of `a` and a term of `b` share a parameter
      leaf (correlated factors need a joint expectation of several variables).
  """
  terms = []
  for ta in a.terms:
    for tb in b.terms:
      parts = ta.parts + tb.parts
      leaves = [A.term_leaves(p) for p in parts]
      for i in range(len(parts)):
        for j in range(i):
          if leaves[i] & leaves[j]:
            raise SeveralGaussians(
                'a product of two random Gaussian values that are correlated but not '
                'proportional (they share a parameter, e.g. a common bias); only products of '
                'independent values (different weights) or of functions of one Gaussian '
                'have a kernel rule; use fallback="monte_carlo".')
      terms.append(dataclasses.replace(ta, cofactors=ta.cofactors + tb.parts))
  if b.offset is not None:
    terms += map_terms_scale(dataclasses.replace(a, offset=None), b.offset).terms
  if a.offset is not None:
    terms += map_terms_scale(dataclasses.replace(b, offset=None), a.offset).terms
  off = None if a.offset is None or b.offset is None else a.offset * b.offset
  return A.Wide(a.shape, a.roles, tuple(terms), off, a.hidden)


def check_whole_use(ctx, p) -> None:
  """Refuses the whole of a parameter where slices of it are used too (they
  would share entries; `spatial.param_slice`)."""
  if ctx.moments.param_slices.get(id(p.leaf)):
    raise ctx.unsupported(f'parameter {p.leaf.name!r} is used both whole and sliced')
