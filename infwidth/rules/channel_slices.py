"""Slices of a wide value along its channel axis (`z[:, :H]`, `jnp.split`).

Channel `c` of a wide value is a function of entry `c` of every source it
is built from: column `c` of each weight's output axis, entry `c` of each
bias. A slice of the channels therefore reads other entries of the same
parameters — a *channel block* of each leaf, a leaf of its own with the
parent's moments — and disjoint slices are independent copies of the value
with the same per-channel moments. The four gates of an LSTM computed by one
matrix and split are four independent Gaussians, not one.

The same block of a leaf is the same sub-leaf wherever it is read (a weight
reused at every step of a loop stays correlated with itself); overlapping
blocks would share entries and are refused.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Tuple

from infwidth.domain import values as A


def slice_channels(ctx, w: A.Wide, axis: int, indices: Tuple[int, ...]) -> A.Wide:
  """The channels `indices` along channel axis `axis` of `w` (same roles,
  that axis resized); its sources are the matching blocks of `w`'s."""
  if isinstance(w, A.ChannelConcat):
    raise ctx.unsupported('slicing the channels of a value concatenated along its channel '
                          'axis')
  key = (sum(1 for r in w.roles[:axis] if r == 'c'), tuple(indices))
  shape = w.shape[:axis] + (len(indices),) + w.shape[axis + 1:]
  return dataclasses.replace(w, shape=shape,
                             terms=tuple(_term(ctx, t, key) for t in w.terms))


def _term(ctx, t: A.Term, key) -> A.Term:
  return dataclasses.replace(
      t, combo=_combo(ctx, t.combo, key), pargs=tuple(_combo(ctx, c, key) for c in t.pargs),
      gargs=tuple(_combo(ctx, c, key) for c in t.gargs),
      factors=tuple(_source(ctx, s, key) for s in t.factors),
      cofactors=tuple(_term(ctx, c, key) for c in t.cofactors))


def _combo(ctx, c: A.Combo, key) -> A.Combo:
  return dataclasses.replace(c, sources=tuple(_source(ctx, s, key) for s in c.sources))


def _source(ctx, s: A.Source, key) -> A.Source:
  """The block `key` of source `s`, one object per (source, block)."""
  memo = ctx.moments.channel_slices
  if (s.uid, key) in memo:
    return memo[(s.uid, key)]
  out = copy.copy(s)
  out.uid = next(A._ids)
  if isinstance(s, A.MappedSource):
    out.base = slice_channels(ctx, s.base, _channel_axis(s.base, key[0]), key[1])
    out.ops = dict(s.ops)
  else:
    leaf = _sub_leaf(ctx, s.leaf, key)
    out.leaf = leaf
    out.param = dataclasses.replace(s.param, leaf=leaf)
  memo[(s.uid, key)] = out
  ctx.moments.keep_alive.append(s)
  return out


def _channel_axis(w: A.Wide, k: int) -> int:
  """The position of `w`'s `k`-th channel axis."""
  return [i for i, r in enumerate(w.roles) if r == 'c'][k]


def _sub_leaf(ctx, leaf: A.ParamLeaf, key) -> A.ParamLeaf:
  blocks = ctx.moments.channel_slices.setdefault(('leaf', id(leaf)), {})
  if key not in blocks:
    if any(k[0] == key[0] and set(k[1]) & set(key[1]) for k in blocks):
      raise ctx.unsupported(f'overlapping channel slices of a value computed from parameter '
                            f'{leaf.name!r} (they would share its entries)')
    idx = key[1]
    where = f'{idx[0]}' + (f'..{idx[-1]}' if len(idx) > 1 else '')
    blocks[key] = A.ParamLeaf(leaf.index, f'{leaf.name}[channels {where}]', leaf.shape,
                              leaf.mean, leaf.var, leaf.ntk_weight, parent=leaf)
    ctx.moments.keep_alive.append(leaf)
  return blocks[key]
