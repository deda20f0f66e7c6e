"""The moment engine: second moments and NTKs of the values of `infwidth.algebra`.

`Moments` computes, for two batches of inputs, the per-channel covariances
(`PairStats`: cross and same-input blocks) and NTKs of sources, Gaussian
combinations, terms and wide values, memoised per call (DESIGN §2, §5).
Elementwise chains go to `infwidth.domain.gaussian_engine`.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain.values import (ZERO, ChannelConcat, Combo, DetChannels, KernelSource,
                              LinearSource, MappedSource, NeedFullSpatial, NoiseSource, PairStats,
                              ParamSource, Source, Term, Wide, _add, _is_zero, _mul, align,
                              at_channel, batch_diagonal, channel_arrays, term_leaves)
from infwidth.domain.errors import UnsupportedValueError
from infwidth.domain import gaussian_engine
from infwidth.domain.noise import noise_pair
from infwidth.domain.chain import Chain, ChainBuilder, derivative, polynomial_degree
from infwidth.domain.collapse import collapse, finish_term


class Moments:
  """Covariances and NTKs between values at two batches, memoised per call.

  Args:
    n1: size of the first batch (rows).
    n2: size of the second batch (columns).
    x1_is_x2: the two batches are the same inputs (joint batch = rows).
    dtype: working float dtype.
    diag: track only equal spatial positions (DESIGN §5): blocks are
      `(N1, N2, *S)` and `(N, *S)` instead of `(N1, N2, *S, *S)`. A map
      that mixes positions (pooling) gets its base's full blocks, so only
      the values below it are tracked in full. Pairing values on different
      spatial grids raises `NeedFullSpatial`.
  """

  def __init__(self, n1: int, n2: int, x1_is_x2: bool, dtype, diag: bool = False):
    self.n1, self.n2, self.x1_is_x2, self.dtype = n1, n2, x1_is_x2, dtype
    self.diag = diag
    self._cache: Dict[Any, Any] = {}
    self._full_cache: Dict[Any, Any] = {}  # full blocks needed below a diagonal value
    self.sources: Dict[Any, Any] = {}  # interning of linear sources by use
    self.keep_alive = []  # values whose ids key `sources`
    self.param_slices: Dict[int, Dict[Any, Any]] = {}  # sub-leaves by parent leaf id
    self.channel_slices: Dict[Any, Any] = {}  # channel blocks of sources and leaves
    self.noise_streams: Dict[Any, Any] = {}  # random bits by key and shape
    self.leaf_orientations: Dict[int, Any] = {}  # contracted leaf axes of each weight

  # -- layout plumbing ------------------------------------------------------

  def rows(self, arr):
    if isinstance(arr, float) or arr.shape[0] == 1:
      return arr
    return arr[:self.n1]

  def cols(self, arr):
    if isinstance(arr, float) or arr.shape[0] == 1 or self.x1_is_x2:
      return arr
    return arr[self.n1:]

  def joint(self, rows, cols):
    """Per-input statistics over the joint batch from the two halves."""
    if self.x1_is_x2 or isinstance(rows, float):
      return rows
    return jnp.concatenate([jnp.broadcast_to(rows, (self.n1,) + rows.shape[1:]),
                            jnp.broadcast_to(cols, (self.n2,) + cols.shape[1:])])

  def as_side(self, arr, side: str, na: int, nb: int):
    """Places a `(B, *S)` array for pairing: side 'a' → `(B, 1, *S, *1)`, 'b' → `(1, B, *1, *S)`.

    `na`/`nb` are the numbers of spatial axes of the two paired values. In
    diagonal mode both sides share the spatial axes: `(B, 1, *S)`, `(1, B, *S)`.
    """
    if isinstance(arr, float):
      return arr
    if self.diag:
      return arr[:, None] if side == 'a' else arr[None]
    if side == 'a':
      return arr.reshape((arr.shape[0], 1) + arr.shape[1:] + (1,) * nb)
    return arr.reshape((1, arr.shape[0]) + (1,) * na + arr.shape[1:])

  def as_diag_side(self, arr, side: str, na: int, nb: int):
    """Same-input pairing: side 'a' → `(B, *S, *1)`, 'b' → `(B, *1, *S)`."""
    if isinstance(arr, float) or self.diag:
      return arr
    if side == 'a':
      return arr.reshape(arr.shape + (1,) * nb)
    return arr.reshape((arr.shape[0],) + (1,) * na + arr.shape[1:])

  def spatial_diagonal(self, block, k: int):
    """`(B, *S, *S)` → `(B, *S)`: entries at equal positions."""
    if self.diag:
      return block
    return _equal_positions(block, 1, k)

  # -- sources --------------------------------------------------------------

  def source_pair(self, a: Source, b: Source) -> Optional[PairStats]:
    """Covariance of two sources, None where it is structurally zero."""
    if a.leaf is not b.leaf:
      return None
    key = ('src', a.uid, b.uid)
    if key not in self._cache:
      self._cache[key] = self._source_pair(a, b)
    return self._cache[key]

  def _source_pair(self, a: Source, b: Source) -> PairStats:
    leaf = a.leaf
    c = a.param.scale * b.param.scale
    if isinstance(a, KernelSource):
      k = a.kernel
      return PairStats(k.nngp, k.cov1, k.cov1 if k.cov2 is None else k.cov2)
    if isinstance(a, NoiseSource):
      return noise_pair(self, a, b)
    if isinstance(a, MappedSource):
      if self.diag and not (a.selection and b.selection and a.same_map(b)):
        return self._mixing_map_pair(a, b)
      st = self.wide_pair(a.base, b.base)
      if self.diag:
        mapped = lambda x, lead: a.apply(x, lead)
      else:
        mapped = lambda x, lead: b.apply(a.apply(x, lead), lead + len(a.spatial))
      return PairStats(*(mapped(x, lead) if not isinstance(x, float) else x
                         for x, lead in ((st.cross, 2), (st.diag1, 1), (st.diag2, 1))))
    if isinstance(a, ParamSource) and isinstance(b, ParamSource):
      v = c * leaf.var
      return PairStats(v, v, v)
    if isinstance(a, LinearSource) and isinstance(b, LinearSource):
      return _scale_stats(self.input_moment(a, b), c * leaf.var)
    raise UnsupportedValueError(
        f'parameter {leaf.name!r} is used both as a weight and elementwise; '
        'pass wide_axes= or restructure the model.')

  def input_moment(self, a: 'LinearSource', b: 'LinearSource') -> PairStats:
    """`Σ_contracted y_a y_b'`: `width · E[y_a y_b']` (wide) or a finite sum over x."""
    key = ('inmom', a.uid, b.uid)
    if key in self._cache:
      return self._cache[key]
    ya, yb = a.inputs, b.inputs
    if (a.transform is None) != (b.transform is None) or a.traced != b.traced:
      raise UnsupportedValueError(f'parameter {a.leaf.name!r} is used in two different kinds of '
                          'linear map; weight sharing needs the same map.')
    if isinstance(ya, Wide) and isinstance(yb, Wide):
      st = self.wide_pair(ya, yb)
      if a.traced:
        st = PairStats(*(trace_spatial(x, lead, ya.spatial, yb.spatial, a.traced, self.diag)
                         for x, lead in ((st.cross, 2), (st.diag1, 1), (st.diag2, 1))))
      out = _scale_stats(st, float(a.width))
    elif a.input_moment is not None and a.input_moment is b.input_moment:
      out = a.input_moment(self, ya, yb)  # e.g. a convolution's patches of the input
    elif not isinstance(ya, Wide) and not isinstance(yb, Wide):
      out = self._det_contraction(ya, len(a.spatial), yb, len(b.spatial))
    elif isinstance(ya, ChannelConcat) or isinstance(yb, ChannelConcat) or (
        getattr(a, 'contracted_leaf_axes', None) is not None
        and a.contracted_leaf_axes == getattr(b, 'contracted_leaf_axes', None)):
      # The same axes of the weight summed: an array where the other use has
      # wide channels (an RNN's initial state against a later step).
      out = self._det_with_wide(a, b)
    else:
      raise UnsupportedValueError(
          f'parameter {a.leaf.name!r} contracts both an input axis and a wide axis; '
          'weight tying between an embedding and a readout needs wide_axes=.')
    if a.transform is not None:
      out = PairStats(*(a.transform(x, lead, self.diag) if not isinstance(x, float) else x
                        for x, lead in ((out.cross, 2), (out.diag1, 1), (out.diag2, 1))))
    self._cache[key] = out
    return out

  def _det_with_wide(self, a: 'LinearSource', b: 'LinearSource') -> PairStats:
    """`Σ_c y_c y′_c` where one use of a weight contracts a deterministic array
    `z` and the other the same axis of a wide value, or of a concatenation of
    deterministic and wide blocks (an RNN's step 0, `zeros @ W` or `[x_0,
    zeros] @ W`, and a later step, `h @ W` or `[x_t, h] @ W`). Along a
    deterministic block the arrays pair entry by entry; along a wide block
    `h`, whose channels are i.i.d. and independent of the index, `Σ_c z_c h′_c`
    tends to `(Σ_c z_c)·E[h′]` (zero for a zero initial state, which is then
    not evaluated; the fluctuation is of order √H against the fan-in)."""
    wide_is_a = isinstance(a.inputs, Wide)
    wide, arr = (a.inputs, b.inputs) if wide_is_a else (b.inputs, a.inputs)
    parts = wide.parts if isinstance(wide, ChannelConcat) else (wide,)
    k = len(a.spatial)
    if (arr.ndim != 2 + k or arr.shape[-1] != wide.width or wide.hidden or a.traced
        or len(a.spatial) != len(b.spatial) or a.transform is not None
        or a.input_moment is not None or b.input_moment is not None):
      raise UnsupportedValueError(
          f'parameter {a.leaf.name!r} contracts an array in one use and a wide value in '
          'another, in different layouts; weight sharing needs the same map (weight tying '
          'between an embedding and a readout needs wide_axes=).')
    out, start = ZERO, 0
    for part in parts:
      block = arr[..., start:start + part.width]
      start += part.width
      if isinstance(part, DetChannels):
        xa, xb = (part.canonical(), block) if wide_is_a else (block, part.canonical())
        out = out + self._det_contraction(xa, k, xb, k)
        continue
      if not isinstance(block, jax.core.Tracer) and not np.any(np.asarray(block)):
        continue
      if part.spatial:
        raise UnsupportedValueError(
            f'parameter {a.leaf.name!r} contracts a wide value with spatial axes in one use '
            'and a nonzero array in its place in another; this is not supported yet.')
      total = jnp.sum(block, axis=-1)
      pair = []
      for wa, wb in (('rows', 'cols'), ('rows', 'rows'), ('cols', 'cols')):
        side = lambda which: self.rows(total) if which == 'rows' else self.cols(total)
        ea = self.wide_first_moment(part, wa) if wide_is_a else side(wa)
        eb = side(wb) if wide_is_a else self.wide_first_moment(part, wb)
        ea, eb = jnp.reshape(ea, (-1,)), jnp.reshape(eb, (-1,))
        pair.append(ea[:, None] * eb[None] if not pair else ea * eb)
      out = out + PairStats(*pair)
    return out

  def _det_channels_pair(self, a: Wide, b: Wide) -> PairStats:
    """Per-channel moment of two deterministic channel blocks, `x·x′/D`."""
    if not (isinstance(a, DetChannels) and isinstance(b, DetChannels)):
      raise UnsupportedValueError(
          'a deterministic block of a channel concatenation meets a wide block of another '
          'concatenation at the same channels; the concatenations must have the same blocks.')
    st = self._det_contraction(a.canonical(), len(a.spatial), b.canonical(), len(b.spatial))
    return _scale_stats(st, 1.0 / a.width)

  def _det_contraction(self, xa, ka, xb, kb) -> PairStats:
    """`(B, *Sa, *C)` · `(B, *Sb, *C)` summed over the contracted axes C."""
    nc = xa.ndim - 1 - ka
    la, lb = 'abcdefgh'[:ka], ('abcdefgh'[:kb] if self.diag else 'ijklmnop'[:kb])
    lc = 'qrstuvw'[:nc]
    out = la if self.diag else la + lb
    cross = jnp.einsum(f'x{la}{lc},y{lb}{lc}->xy{out}', self.rows(xa), self.cols(xb))
    if self.x1_is_x2 and xa is xb:
      return PairStats(cross, batch_diagonal(cross), batch_diagonal(cross))
    d1 = jnp.einsum(f'x{la}{lc},x{lb}{lc}->x{out}', self.rows(xa), self.rows(xb))
    d2 = d1 if self.x1_is_x2 else jnp.einsum(
        f'x{la}{lc},x{lb}{lc}->x{out}', self.cols(xa), self.cols(xb))
    return PairStats(cross, d1, d2)

  def source_ntk(self, a: Source, b: Source):
    """NTK between two sources (cross block), None where structurally zero."""
    if a.leaf is not b.leaf:
      return None
    key = ('srcntk', a.uid, b.uid)
    if key in self._cache:
      return self._cache[key]
    leaf = a.leaf
    c = a.param.scale * b.param.scale
    if isinstance(a, KernelSource):
      out = 0.0 if a.kernel.ntk is None else a.kernel.ntk
    elif isinstance(a, MappedSource):
      mixing = self.diag and not (a.selection and b.selection and a.same_map(b))
      t = self._mixing_map_ntk(a, b) if mixing else self.wide_ntk(a.base, b.base)
      if isinstance(t, float) or mixing:
        out = t
      elif self.diag:
        out = a.apply(t, 2)
      else:
        out = b.apply(a.apply(t, 2), 2 + len(a.spatial))
    elif isinstance(a, ParamSource):
      out = c * leaf.ntk_weight
    elif isinstance(a, NoiseSource):
      out = 0.0  # no parameter: a mask has no gradient
    else:
      # DESIGN §2: Θ_z = c²·M·w (W's own gradient) + c²·n·v·Θ_y (through W).
      out = _mul(c * leaf.ntk_weight, self.input_moment(a, b).cross)
      if isinstance(a.inputs, Wide) and isinstance(b.inputs, Wide) and a.random:
        t = self.wide_ntk(a.inputs, b.inputs)
        if a.traced and not isinstance(t, float):
          t = trace_spatial(t, 2, a.inputs.spatial, b.inputs.spatial, a.traced, self.diag)
        if a.transform is not None and not isinstance(t, float):
          t = a.transform(t, 2, self.diag)
        out = _add(out, _mul(c * leaf.var * a.width, t))
    self._cache[key] = out
    return out

  # -- maps that mix positions, below values tracked at equal positions ------

  @contextlib.contextmanager
  def _full_tracking(self):
    """Full spatial blocks (their own memo) for what a pixel-diagonal value needs."""
    saved = self.diag, self._cache
    self.diag, self._cache = False, self._full_cache
    try:
      yield
    finally:
      self.diag, self._cache = saved

  def _mixing_map_pair(self, a: MappedSource, b: MappedSource) -> PairStats:
    """Pixel-diagonal moments of maps that mix positions (pooling): the
    mapped sources' full blocks at equal output positions. Only the values
    below the map are tracked in full (DESIGN §5)."""
    k = self._same_grid(a, b)
    with self._full_tracking():
      st = self.source_pair(a, b)
    return PairStats(_equal_positions(st.cross, 2, k), _equal_positions(st.diag1, 1, k),
                     _equal_positions(st.diag2, 1, k))

  def _mixing_map_ntk(self, a: MappedSource, b: MappedSource):
    k = self._same_grid(a, b)
    with self._full_tracking():
      t = self.source_ntk(a, b)
    return _equal_positions(t, 2, k)

  @staticmethod
  def _same_grid(a: MappedSource, b: MappedSource) -> int:
    """The number of spatial axes, where a and b map to the same positions."""
    if tuple(a.spatial) != tuple(b.spatial):
      raise NeedFullSpatial()
    return len(a.spatial)

  # -- combinations ---------------------------------------------------------

  def combo_pair(self, a: Combo, b: Combo) -> PairStats:
    """Centred covariance of two Gaussian combinations."""
    key = ('combo', a.key(), b.key())
    if key in self._cache:
      return self._cache[key]
    out = ZERO
    for (sa, ca), (sb, cb) in itertools.product(zip(a.sources, a.coefs), zip(b.sources, b.coefs)):
      st = self.source_pair(sa, sb)
      if st is None:
        continue
      st = self._embed_pair(st, sa.spatial, sb.spatial, a.spatial, b.spatial)
      out = out + self._weight_pair(st, ca, cb, len(a.spatial), len(b.spatial))
    self._cache[key] = out
    return out

  def combo_ntk(self, a: Combo, b: Combo):
    key = ('combontk', a.key(), b.key())
    if key in self._cache:
      return self._cache[key]
    out = 0.0
    ka, kb = len(a.spatial), len(b.spatial)
    for (sa, ca), (sb, cb) in itertools.product(zip(a.sources, a.coefs), zip(b.sources, b.coefs)):
      t = self.source_ntk(sa, sb)
      if t is None:
        continue
      t = self._embed_cross(t, sa.spatial, sb.spatial, a.spatial, b.spatial)
      out = _add(out, _mul(_mul(self.as_side(self.rows(ca), 'a', ka, kb) if not isinstance(ca, float) else ca,
                                self.as_side(self.cols(cb), 'b', ka, kb) if not isinstance(cb, float) else cb), t))
    self._cache[key] = out
    return out

  def _weight_pair(self, st: PairStats, ca, cb, ka, kb) -> PairStats:
    side = lambda c, f, s: c if isinstance(c, float) else self.as_side(f(c), s, ka, kb)
    dside = lambda c, f, s: c if isinstance(c, float) else self.as_diag_side(f(c), s, ka, kb)
    cross = _mul(_mul(side(ca, self.rows, 'a'), side(cb, self.cols, 'b')), st.cross)
    d1 = _mul(_mul(dside(ca, self.rows, 'a'), dside(cb, self.rows, 'b')), st.diag1)
    d2 = _mul(_mul(dside(ca, self.cols, 'a'), dside(cb, self.cols, 'b')), st.diag2)
    return PairStats(cross, d1, d2)

  def _embed_pair(self, st, sa_sp, sb_sp, a_sp, b_sp) -> PairStats:
    if sa_sp == a_sp and sb_sp == b_sp:
      return st
    return PairStats(self._embed_cross(st.cross, sa_sp, sb_sp, a_sp, b_sp),
                     _embed_block(st.diag1, 1, sa_sp, sb_sp, a_sp, b_sp, self.diag),
                     _embed_block(st.diag2, 1, sa_sp, sb_sp, a_sp, b_sp, self.diag))

  def _embed_cross(self, arr, sa_sp, sb_sp, a_sp, b_sp):
    if sa_sp == a_sp and sb_sp == b_sp:
      return arr
    return _embed_block(arr, 2, sa_sp, sb_sp, a_sp, b_sp, self.diag)

  # -- terms and wide values ------------------------------------------------

  def _var(self, combo: Combo, which: str):
    st = self.combo_pair(combo, combo)
    block = st.diag1 if which == 'rows' else st.diag2
    return self.spatial_diagonal(block, len(combo.spatial))

  def _mean(self, combo: Combo, which: str):
    m = combo.mean
    return m if isinstance(m, float) else (self.rows(m) if which == 'rows' else self.cols(m))

  def _args(self, term: Term, which: str):
    f = self.rows if which == 'rows' else self.cols
    pa = tuple(f(p.mean) if not isinstance(p.mean, float) else p.mean for p in term.pargs)
    return pa + tuple(f(d) for d in term.dargs)

  def term_first_moment(self, term: Term, which: str):
    """`E[term]` per input of one side, canonical layout `(B, *S)`: the
    product of its independent parts' means."""
    out = 1.0
    for part in term.parts:
      out = _mul(out, self._part_first_moment(part, which))
    return out

  def _part_first_moment(self, term: Term, which: str):
    mean = self._mean(term.combo, which)
    fac = 1.0
    for p in term.factors:
      fac = fac * p.mean
    if term.gargs:
      means, cov = self._joint_side(term, which, lambda a: a, len(term.combo.spatial))
      degree = _exact_degree(term.chain, len(means))
      if degree is None:
        first, _ = gaussian_engine.expect_multi_sampled(
            term.chain, self._args(term, which), len(means), None, (), means, cov)
        return _mul(fac, first)
      return _mul(fac, gaussian_engine.expect_multi(
          term.chain, self._args(term, which), len(means), None, (), means, cov, degree))
    if term.chain.is_identity:
      return _mul(fac, mean)
    var = self._var(term.combo, which)
    return _mul(fac, _constant_folded(gaussian_engine.expect_single, term.chain,
                                      self._args(term, which), mean, var))

  def wide_first_moment(self, w: Wide, which: str):
    """`E[w_i]` per input for a channel `i` drawn uniformly: for a value
    concatenated along its channel axis, the blocks' means weighted by their
    channel counts (what a sum over the channels divided by the width gives)."""
    if isinstance(w, DetChannels):
      x = w.canonical()
      return jnp.mean(self.rows(x) if which == 'rows' else self.cols(x), axis=-1)
    if isinstance(w, ChannelConcat):
      out = 0.0
      for f, part in zip(w.fractions, w.parts):
        out = _add(out, _mul(f, self.wide_first_moment(part, which)))
      return out
    if channel_arrays(w):
      return self.channel_average((w,), lambda v: (self.wide_first_moment(v, which),))[0]
    out = 0.0 if w.offset is None else (self.rows(w.offset) if which == 'rows' else self.cols(w.offset))
    for t in w.terms:
      out = _add(out, term_first_moment_aligned(self, t, which, w))
    return out

  def term_pair(self, ta: Term, tb: Term, sa, sb, mode: str):
    """Second moment `E[ta tb]` (mode 'cross', 'diag1' or 'diag2') and, for 'cross', the NTK.

    Terms with cofactors are products of independent parts. Each part of one
    side may depend on at most one part of the other (they share a parameter
    leaf); then `E[Π pₖ Π qₗ]` factorises into the matched pairs' second
    moments times the unmatched parts' means, and the NTK (gradient
    independence) is `Σ_pairs Θ(p, q) · Π_{other pairs} E[p′q′] · Π means`
    (docs/semantics.md, "Functions of several Gaussian values").
    """
    if not (ta.cofactors or tb.cofactors):
      return self._part_pair(ta, tb, sa, sb, mode)
    pa, pb = ta.parts, tb.parts
    la, lb = [term_leaves(p) for p in pa], [term_leaves(q) for q in pb]
    match = {}
    for i in range(len(pa)):
      deps = [j for j in range(len(pb)) if la[i] & lb[j]]
      if len(deps) > 1 or any(j in match.values() for j in deps):
        raise UnsupportedValueError(
            'a product of independent Gaussian values is paired with a value that depends '
            'on several of its factors; this needs a joint expectation of more than two '
            'Gaussians and is not supported yet.')
      if deps:
        match[i] = deps[0]
    ka, kb = len(sa), len(sb)
    wa, wb, put = self._sides(mode, ka, kb)
    means = 1.0
    for i in range(len(pa)):
      if i not in match:
        means = _mul(means, put(self._part_first_moment(pa[i], wa), 'a'))
    for j in range(len(pb)):
      if j not in match.values():
        means = _mul(means, put(self._part_first_moment(pb[j], wb), 'b'))
    pairs = [self._part_pair(pa[i], pb[j], sa, sb, mode) for i, j in match.items()]
    value = means
    for v, _ in pairs:
      value = _mul(value, v)
    if mode != 'cross':
      return value, None
    ntk = 0.0
    for k, (_, n) in enumerate(pairs):
      if n is None or _is_zero(n):
        continue
      rest = means
      for m, (v, _) in enumerate(pairs):
        if m != k:
          rest = _mul(rest, v)
      ntk = _add(ntk, _mul(rest, n))
    return value, ntk

  def _sides(self, mode: str, ka: int, kb: int):
    """For a pair block of `mode` ('cross', 'diag1', 'diag2'): the halves of
    the joint batch its two sides read ('rows'/'cols'), and `put(arr, side)`
    placing a side's `(B, *S)` statistic in the block's layout."""
    wa, wb = ('rows', 'cols') if mode == 'cross' else (('rows', 'rows') if mode == 'diag1'
                                                       else ('cols', 'cols'))
    place = self.as_side if mode == 'cross' else self.as_diag_side
    return wa, wb, lambda arr, side: arr if isinstance(arr, float) else place(arr, side, ka, kb)

  # -- chains of several Gaussians ------------------------------------------

  def _joint_side(self, term: Term, which: str, put, k: int):
    """Means and covariances of a term's Gaussian inputs `(u, *gargs)` at one
    input and position (side `which`), each placed by `put`."""
    combos = (term.combo,) + tuple(term.gargs)
    means = [put(self._mean(c, which)) for c in combos]
    cov = [[None] * len(combos) for _ in combos]
    for i, ci in enumerate(combos):
      for j in range(i, len(combos)):
        st = self.combo_pair(ci, combos[j])
        block = st.diag1 if which == 'rows' else st.diag2
        cov[i][j] = cov[j][i] = put(self.spatial_diagonal(block, k))
    return means, cov

  def _multi_pair(self, ta: Term, tb: Term, sa, sb, mode: str):
    """`E[φ(u, g…) ψ(v, h…)]` and its NTK for chains of several Gaussians: a
    joint integral over all of their inputs (DESIGN §2 with the joint
    covariance of both sides; docs/semantics.md)."""
    ka, kb = len(sa), len(sb)
    fac_m, fac_ntk = _factor_moments(ta.factors, tb.factors)
    if _is_zero(fac_m):
      return 0.0, None
    wa, wb, put = self._sides(mode, ka, kb)
    put_a, put_b = (lambda arr: put(arr, 'a')), (lambda arr: put(arr, 'b'))
    mean_a, cov_a = self._joint_side(ta, wa, put_a, len(ta.combo.spatial))
    mean_b, cov_b = self._joint_side(tb, wb, put_b, len(tb.combo.spatial))
    ga, gb = (ta.combo,) + tuple(ta.gargs), (tb.combo,) + tuple(tb.gargs)
    na, nb = len(ga), len(gb)
    cov = [[0.0] * (na + nb) for _ in range(na + nb)]
    for i in range(na):
      for j in range(na):
        cov[i][j] = cov_a[i][j]
    for i in range(nb):
      for j in range(nb):
        cov[na + i][na + j] = cov_b[i][j]
    for i, ci in enumerate(ga):
      for j, dj in enumerate(gb):
        st = self.combo_pair(ci, dj)
        cov[i][na + j] = cov[na + j][i] = {'cross': st.cross, 'diag1': st.diag1,
                                           'diag2': st.diag2}[mode]
    aa = tuple(put_a(x) for x in self._args(ta, wa))
    ab = tuple(put_b(x) for x in self._args(tb, wb))
    means = mean_a + mean_b
    # NTK (gradient independence): Σ_{k,l} E[∂_kφ ∂_lψ] Θ(z_k, z′_l) over the
    # chains' inputs (the Gaussians and the deterministic-valued parameters).
    ins_a, ins_b = ga + tuple(ta.pargs), gb + tuple(tb.pargs)
    degree = _exact_degree(ta.chain, na, tb.chain, nb)
    if degree is None:
      # Not a polynomial, or too many Gaussians for a tensor rule: quasi-Monte
      # Carlo over the joint Gaussian, values and NTK from the same points.
      theta = []
      if mode == 'cross':
        for i, ci in enumerate(ins_a):
          for j, dj in enumerate(ins_b):
            t = self.combo_ntk(ci, dj)
            if not _is_zero(t):
              theta.append((i, j, t))
      args = (ta.chain, aa, na, tb.chain, ab, means, cov)
      opts = dict(n_diff_a=len(ta.pargs), n_diff_b=len(tb.pargs), theta=theta)
      mirror = (self._mirror(ka, args, theta) if mode == 'cross' and self.x1_is_x2 and ta is tb
                else None)
      if mirror is None:
        second, e = gaussian_engine.expect_multi_sampled(*args, **opts)
      else:
        second, e = _sampled_on_half(mirror, args, opts)
      value = _mul(fac_m, second)
      if mode != 'cross':
        return value, None
      ntk = 0.0 if e is None else _mul(fac_m, e)
      if fac_ntk:
        ntk = _add(ntk, _mul(fac_ntk, second))
      return value, ntk
    # Polynomials in their Gaussians: a tensor Gauss–Hermite rule with d nodes
    # per dimension is exact up to total degree 2d − 1 (Isserlis' theorem,
    # computed).
    second = gaussian_engine.expect_multi(ta.chain, aa, na, tb.chain, ab, means, cov, degree)
    value = _mul(fac_m, second)
    if mode != 'cross':
      return value, None
    ntk = 0.0
    for i, ci in enumerate(ins_a):
      for j, dj in enumerate(ins_b):
        t = self.combo_ntk(ci, dj)
        if _is_zero(t):
          continue
        e = gaussian_engine.expect_multi(_input_derivative(ta.chain, i), aa, na,
                                         _input_derivative(tb.chain, j), ab, means, cov,
                                         degree)
        ntk = _add(ntk, _mul(fac_m, _mul(e, t)))
    if fac_ntk:
      ntk = _add(ntk, _mul(fac_ntk, second))
    return value, ntk

  def _mirror(self, k: int, args, theta):
    """For the cross block of a value with itself on one batch: `(shape,
    kept, mirrored)`, the flat indices of the entries `(x, x′, a, b)` on one
    side of the exchange `(x′, x, b, a)` and of their images; None where the
    block has another layout. The quasi-Monte Carlo rule is exactly symmetric
    under the exchange (`expect_multi_sampled`), so half the entries give all."""
    entries = list(args[5]) + [c for row in args[6] for c in row] + list(args[1]) + list(args[4])
    entries += [t for _, _, t in theta]
    shape = tuple(jnp.broadcast_shapes(*(jnp.shape(a) for a in entries)))
    n = self.n1
    sides = 1 if self.diag else 2
    if len(shape) != 2 + sides * k or shape[:2] != (n, n) or (
        sides == 2 and shape[2:2 + k] != shape[2 + k:]):
      return None
    perm = (1, 0) + (tuple(range(2, 2 + k)) if self.diag else
                     tuple(range(2 + k, 2 + 2 * k)) + tuple(range(2, 2 + k)))
    idx = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    image = np.transpose(idx, perm).reshape(-1)
    keep = idx.reshape(-1) <= image
    return shape, idx.reshape(-1)[keep], image[keep]

  def _part_pair(self, ta: Term, tb: Term, sa, sb, mode: str):
    if ta.gargs or tb.gargs:
      return self._multi_pair(ta, tb, sa, sb, mode)
    ka, kb = len(sa), len(sb)
    fac_m, fac_ntk = _factor_moments(ta.factors, tb.factors)
    if _is_zero(fac_m):
      return 0.0, None
    st = self.combo_pair(ta.combo, tb.combo)
    cov = {'cross': st.cross, 'diag1': st.diag1, 'diag2': st.diag2}[mode]
    wa, wb, put = self._sides(mode, ka, kb)
    ma, mb = put(self._mean(ta.combo, wa), 'a'), put(self._mean(tb.combo, wb), 'b')
    va = put(self._var(ta.combo, wa), 'a')
    vb = put(self._var(tb.combo, wb), 'b')
    aa = tuple(put(x, 'a') for x in self._args(ta, wa))
    ab = tuple(put(x, 'b') for x in self._args(tb, wb))
    both_gauss = ta.chain.is_identity and tb.chain.is_identity
    if both_gauss:
      second = _add(cov, _mul(ma, mb))
      dd = 1.0
    else:
      second, dd = _constant_folded(gaussian_engine.expect_pair, ta.chain, aa, tb.chain, ab, ma, mb,
                                    va, vb, cov, ntk=(mode == 'cross'))
    value = _mul(fac_m, second)
    if mode != 'cross':
      return value, None
    # NTK (gradient independence): Σ_{k,l} E[∂_kφ ∂_lψ] Θ(z_k, z'_l) over the
    # chain inputs (u and deterministic-valued parameters), times the factor
    # moments, plus each shared factor's own gradient E[φψ]·w.
    ntk = _mul(fac_m, _mul(dd, self.combo_ntk(ta.combo, tb.combo)))
    for i, pa in enumerate(ta.pargs):
      for j, pb in enumerate(tb.pargs):
        t = self.combo_ntk(pa, pb)
        if _is_zero(t):
          continue
        e = _arg_derivative_moment(ta.chain, i + 1, aa, tb.chain, j + 1, ab, ma, mb, va, vb, cov)
        ntk = _add(ntk, _mul(fac_m, _mul(e, t)))
    if ta.pargs or tb.pargs:
      for i, pa in enumerate(ta.pargs):
        if not _is_zero(self.combo_ntk(pa, tb.combo)):
          raise UnsupportedValueError('a parameter enters a nonlinearity both inside and outside '
                              'its Gaussian argument; this is not supported yet.')
    if fac_ntk:
      ntk = _add(ntk, _mul(fac_ntk, second))
    return value, ntk

  def wide_pair(self, a: Wide, b: Wide) -> PairStats:
    """Per-channel second moments `E[a_i(x) b_i(x')]` of two wide values."""
    key = ('wide', id(a), id(b))
    if key in self._cache:
      return self._cache[key]
    if isinstance(a, DetChannels) or isinstance(b, DetChannels):
      self._cache[key] = self._det_channels_pair(a, b)
      return self._cache[key]
    if isinstance(a, ChannelConcat) or isinstance(b, ChannelConcat):
      out = ZERO
      for f, pa, pb in _concat_parts(a, b):
        out = out + _scale_stats(self.wide_pair(pa, pb), f)
      self._cache[key] = out
      return out
    self._compute_wide(a, b)
    return self._cache[key]

  def wide_ntk(self, a: Wide, b: Wide):
    key = ('widentk', id(a), id(b))
    if key not in self._cache:
      if isinstance(a, DetChannels) or isinstance(b, DetChannels):
        self._det_channels_pair(a, b)  # the same blocks on both sides
        self._cache[key] = 0.0  # no parameters: no NTK
      elif isinstance(a, ChannelConcat) or isinstance(b, ChannelConcat):
        out = 0.0
        for f, pa, pb in _concat_parts(a, b):
          out = _add(out, _mul(f, self.wide_ntk(pa, pb)))
        self._cache[key] = out
      else:
        self._compute_wide(a, b)
    return self._cache[key]

  def _compute_wide(self, a: Wide, b: Wide):
    if channel_arrays(a) or channel_arrays(b):
      def one_channel(va, vb):
        self._compute_wide(va, vb)
        st = self._cache[('wide', id(va), id(vb))]
        return st.cross, st.diag1, st.diag2, self._cache[('widentk', id(va), id(vb))]
      cross, d1, d2, ntk = self.channel_average((a, b), one_channel)
      self._cache[('wide', id(a), id(b))] = PairStats(cross, d1, d2)
      self._cache[('widentk', id(a), id(b))] = ntk
      return
    key = ('wide', id(a), id(b)), ('widentk', id(a), id(b))
    if _needs_joint(a, b):
      # Products of independent parts correlated across the pair in more than
      # a one-to-one way (a GRU state `z·h + (1 − z)·n` paired with the next
      # step's, through weights reused at every step): one joint integral of
      # both values, each collapsed into one chain of all its Gaussians.
      a, b = self._one_chain(a), self._one_chain(b)
    sa, sb = a.spatial, b.spatial
    ka, kb = len(sa), len(sb)
    stats, ntk = ZERO, 0.0
    for ta, tb in itertools.product(a.terms, b.terms):
      c, n = self.term_pair(ta, tb, sa, sb, 'cross')
      c = _embed_block(c, 2, ta.combo.spatial, tb.combo.spatial, sa, sb, self.diag)
      d1, _ = self.term_pair(ta, tb, sa, sb, 'diag1')
      d2 = d1 if self.x1_is_x2 else self.term_pair(ta, tb, sa, sb, 'diag2')[0]
      d1 = _embed_block(d1, 1, ta.combo.spatial, tb.combo.spatial, sa, sb, self.diag)
      d2 = _embed_block(d2, 1, ta.combo.spatial, tb.combo.spatial, sa, sb, self.diag)
      stats = stats + PairStats(c, d1, d2)
      if n is not None:
        ntk = _add(ntk, _embed_block(n, 2, ta.combo.spatial, tb.combo.spatial, sa, sb, self.diag))
    # Deterministic parts: E[(o + t)(o' + t')] picks up o·E[t'] + E[t]·o' + o·o'.
    if a.offset is not None or b.offset is not None:
      ma_r, mb_c = self.wide_first_moment(a, 'rows'), self.wide_first_moment(b, 'cols')
      ta_r = _sub(ma_r, self.rows(a.offset) if a.offset is not None else 0.0)
      tb_c = _sub(mb_c, self.cols(b.offset) if b.offset is not None else 0.0)
      oa_r = self.rows(a.offset) if a.offset is not None else 0.0
      ob_c = self.cols(b.offset) if b.offset is not None else 0.0
      extra_cross = _sum3(_mul(self.as_side(oa_r, 'a', ka, kb) if not isinstance(oa_r, float) else oa_r,
                               self.as_side(tb_c, 'b', ka, kb) if not isinstance(tb_c, float) else tb_c),
                          _mul(self.as_side(ta_r, 'a', ka, kb) if not isinstance(ta_r, float) else ta_r,
                               self.as_side(ob_c, 'b', ka, kb) if not isinstance(ob_c, float) else ob_c),
                          _mul(self.as_side(oa_r, 'a', ka, kb) if not isinstance(oa_r, float) else oa_r,
                               self.as_side(ob_c, 'b', ka, kb) if not isinstance(ob_c, float) else ob_c))
      d = []
      for which in ('rows', 'cols'):
        f = self.rows if which == 'rows' else self.cols
        ma = self.wide_first_moment(a, which)
        mb = self.wide_first_moment(b, which)
        oa = f(a.offset) if a.offset is not None else 0.0
        ob = f(b.offset) if b.offset is not None else 0.0
        pa_, pb_ = _sub(ma, oa), _sub(mb, ob)
        put = lambda x, s: x if isinstance(x, float) else self.as_diag_side(x, s, ka, kb)
        d.append(_sum3(_mul(put(oa, 'a'), put(pb_, 'b')), _mul(put(pa_, 'a'), put(ob, 'b')),
                       _mul(put(oa, 'a'), put(ob, 'b'))))
      stats = stats + PairStats(extra_cross, d[0], d[1])
    self._cache[key[0]] = stats
    self._cache[key[1]] = ntk

  def _one_chain(self, w: Wide) -> Wide:
    """`w` as one term: a chain of all the Gaussian combinations it depends
    on (equal or proportional ones shared), its offset an argument."""
    key = ('onechain', id(w))
    if key not in self._cache:
      if any(t.combo.spatial != w.spatial for t in w.terms):
        raise UnsupportedValueError(
            'a product of independent Gaussian values is paired with a value that depends '
            'on several of its factors, with terms on different spatial layouts; this is '
            'not supported yet.')
      b, pargs, dargs, gargs = ChainBuilder(), [], [], []
      out, combo = collapse(w, b, pargs, dargs, None, gargs)
      term = finish_term(b, out, combo, pargs, dargs, w.spatial, gargs)
      self.keep_alive.append(w)
      self._cache[key] = Wide(w.shape, w.roles, (term,), None, w.hidden)
    return self._cache[key]

  # -- per-channel arrays ----------------------------------------------------

  def channel_average(self, values, fn):
    """`E_c[fn(*values at channel c)]`: the average over the channels of a
    moment of wide values holding per-channel arrays (`ChannelArray`), all
    read at one channel `c` (docs/semantics.md, "Deterministic arrays along a
    wide axis").

    The channels are grouped by their distinct rows `(a_c, b_c, …)` of the
    arrays' joint table, and `fn` is vmapped over the groups and weighted by
    their counts: cost × number of distinct rows. Where every value is linear
    in the arrays (identity chains: `h·a + b`), the moments are polynomials
    of degree at most two in them and `2r` points with the table's mean and
    covariance (rank r) give the exact average.

    Args:
      values: wide values (no `ChannelConcat`).
      fn: fn(*values) -> a tuple of floats and arrays (moments at one channel).
    Returns:
      the tuple of averages; floats where `fn` gives floats (they do not
      depend on the channel).
    """
    arrays = {}
    for v in values:
      for arr in channel_arrays(v):
        arrays.setdefault(id(arr), arr)
    arrays = list(arrays.values())
    _check_channel_use(values)
    linear = all(t.chain.is_identity and not t.cofactors and not t.gargs
                 for v in values for t in v.terms)
    rows, weights = channel_rows(arrays, linear)
    rows = jnp.asarray(rows, self.dtype)
    floats = {}

    def one(row):
      entries = {id(arr): row[k] for k, arr in enumerate(arrays)}
      at = {}
      for v in values:
        if id(v) not in at:
          at[id(v)] = at_channel(v, entries)
      saved = self._cache
      self._cache = _Overlay(saved)
      try:
        out = fn(*(at[id(v)] for v in values))
      finally:
        overlay, self._cache = self._cache, saved
        # Moments of sources do not depend on the channel (a contraction or
        # a spatial map has averaged below them): keep them.
        for key, val in overlay.own.items():
          if key[0] in ('src', 'srcntk', 'inmom'):
            saved[key] = val
      for k, x in enumerate(out):
        if isinstance(x, float):
          floats[k] = x
      return tuple(jnp.zeros((), self.dtype) if isinstance(x, float) else x for x in out)

    total = None
    for start in range(0, len(weights), CHANNEL_CHUNK):
      w = jnp.asarray(weights[start:start + CHANNEL_CHUNK], self.dtype)
      outs = jax.vmap(one)(rows[start:start + CHANNEL_CHUNK])
      part = tuple(jnp.tensordot(w, o, axes=1) for o in outs)
      total = part if total is None else tuple(t + p for t, p in zip(total, part))
    return tuple(floats.get(k, x) for k, x in enumerate(total))


#: Rows of a channel table evaluated together (vmapped); more are taken in
#: chunks of this size, so memory stays that of `CHANNEL_CHUNK` channels.
CHANNEL_CHUNK = 32


class _Overlay(dict):
  """A memo that reads through to `base` and keeps its own writes: moments
  at one channel must not outlive the average over channels."""

  def __init__(self, base):
    super().__init__()
    self.base = base

  @property
  def own(self):
    return dict(self.items())

  def __contains__(self, key):
    return dict.__contains__(self, key) or key in self.base

  def __getitem__(self, key):
    return dict.__getitem__(self, key) if dict.__contains__(self, key) else self.base[key]


def channel_rows(arrays, linear: bool):
  """`(rows, weights)`: points `(R, k)` and weights `(R,)` whose weighted
  average of any function of the `k` arrays' entries is the average over
  the channels — the distinct rows of the joint table with their
  frequencies, or, for `linear` moments (polynomials of degree ≤ 2 in the
  entries), the fewer `2r` symmetric points `μ ± √r·√λ_j·v_j` of the
  table's mean μ and covariance `Σ_j λ_j v_j v_jᵀ` (rank r)."""
  n = arrays[0].n
  if any(arr.n != n for arr in arrays):
    raise UnsupportedValueError('per-channel arrays of different lengths meet on one channel '
                                f'axis: {sorted({arr.n for arr in arrays})}')
  if not all(arr.concrete for arr in arrays):
    table = jnp.stack([jnp.asarray(arr.values) for arr in arrays], 1)
    return table, np.full(n, 1.0 / n)
  table = np.stack([np.asarray(arr.values, np.float64) for arr in arrays], 1)
  rows, counts = np.unique(table, axis=0, return_counts=True)
  if linear:
    mu = table.mean(0)
    lam, vec = np.linalg.eigh(np.atleast_2d(np.cov(table, rowvar=False, bias=True)))
    keep = lam > 1e-12 * max(lam.max(), 1e-300)
    r = int(keep.sum())
    if 2 * r < len(rows):
      if r == 0:
        return mu[None], np.ones(1)
      steps = (np.sqrt(r * lam[keep]) * vec[:, keep]).T           # (r, k)
      return np.concatenate([mu + steps, mu - steps]), np.full(2 * r, 0.5 / r)
  return rows, counts / n


def _check_channel_use(values):
  """Refuses uses of per-channel arrays whose channel average is not exact
  here (what is supported is in docs/semantics.md)."""
  for v in values:
    for t in v.terms:
      holds = bool(channel_arrays(Wide(v.shape, v.roles, (t,))))
      if holds and (t.cofactors or t.gargs):
        raise UnsupportedValueError(
            'a per-channel array with distinct entries (e.g. trained BatchNorm statistics) '
            'inside a function of several Gaussian values (a product of independent values, '
            'a polynomial of correlated ones) is not supported yet; per-channel arrays in '
            'functions of one Gaussian are.')
      mapped = [s for part in t.parts for c in (part.combo,) + tuple(part.gargs) + tuple(part.pargs)
                for s in c.sources if isinstance(s, MappedSource) and s.per_channel]
      if mapped and any(channel_arrays(u) for u in values):
        raise UnsupportedValueError(
            'a spatial map (pooling, a sum over positions) of a value with per-channel arrays '
            'meets further per-channel arrays of the same channels; their joint average '
            'over channels is not supported yet.')


def _sampled_on_half(mirror, args, opts):
  """`expect_multi_sampled` on the entries `kept` of a block symmetric under
  an exchange of its entries, the others copied from their images."""
  shape, kept, image = mirror
  size = int(np.prod(shape, dtype=np.int64))
  pick = lambda a: a if isinstance(a, float) else jnp.reshape(
      jnp.broadcast_to(a, shape), (size,))[kept]
  f, f_args, ka, g, g_args, means, cov = args
  theta = [(i, j, pick(t)) for i, j, t in opts['theta']]
  second, e = gaussian_engine.expect_multi_sampled(
      f, [pick(a) for a in f_args], ka, g, [pick(a) for a in g_args],
      [pick(m) for m in means], [[pick(c) for c in row] for row in cov],
      n_diff_a=opts['n_diff_a'], n_diff_b=opts['n_diff_b'], theta=theta)

  def spread(v):
    if v is None:
      return None
    out = jnp.zeros((size,), v.dtype).at[kept].set(v).at[image].set(v)
    return out.reshape(shape)

  return spread(second), spread(e)


def trace_spatial(block, lead, sa, sb, traced, diag=False):
  """Sums a `(*lead, *sa, *sb)` block over equal positions of the `traced` roles
  (a `(*lead, *sa)` block in diagonal mode)."""
  if diag:
    axes = tuple(lead + sa.index(r) for r in traced)
    return jnp.sum(block, axis=axes)
  letters = iter('abcdefghijklmnopqrstuvw')
  lead_l = ''.join(next(letters) for _ in range(lead))
  la = {r: next(letters) for r in sa}
  lb = {r: (la[r] if r in traced else next(letters)) for r in sb}
  out = lead_l + ''.join(la[r] for r in sa if r not in traced) + ''.join(
      lb[r] for r in sb if r not in traced)
  src = lead_l + ''.join(la[r] for r in sa) + ''.join(lb[r] for r in sb)
  return jnp.einsum(f'{src}->{out}', block)


def _constant_folded(expect, f, f_args, *rest, **kwargs):
  """`expect(f, f_args, *rest)` of the Gaussian engine, as Python floats where
  every argument after the chains is one: a moment that depends on no input
  (a layer after an all-zero weight sees only its bias) stays a constant, as
  the layouts of this module expect, instead of a 0-d array."""
  numbers = (f_args,) + tuple(a for a in rest if not callable(a) and not isinstance(a, Chain))
  if not all(isinstance(x, float) for x in jax.tree_util.tree_leaves(numbers)):
    return expect(f, f_args, *rest, **kwargs)
  with jax.ensure_compile_time_eval():
    out = expect(f, f_args, *rest, **kwargs)
  return jax.tree_util.tree_map(float, out)


def _needs_joint(a: Wide, b: Wide) -> bool:
  """Whether some pair of terms of `a` and `b` has a part on one side that
  depends on several parts of the other, or two parts depending on one: their
  expectation does not factorise into matched pairs (`Moments.term_pair`)."""
  for ta, tb in itertools.product(a.terms, b.terms):
    if not (ta.cofactors or tb.cofactors):
      continue
    la = [term_leaves(p) for p in ta.parts]
    lb = [term_leaves(q) for q in tb.parts]
    if any(sum(1 for y in lb if x & y) > 1 for x in la):
      return True
    if any(sum(1 for x in la if x & y) > 1 for y in lb):
      return True
  return False


def term_first_moment_aligned(m: Moments, t: Term, which: str, w: Wide):
  fm = m.term_first_moment(t, which)
  return align(fm, t.combo.spatial, w.spatial) if not isinstance(fm, float) else fm


def _sub(a, b):
  if _is_zero(b):
    return a
  return _add(a, _mul(-1.0, b))


def _sum3(a, b, c):
  return _add(_add(a, b), c)


def _scale_stats(st: PairStats, c: float) -> PairStats:
  return PairStats(_mul(c, st.cross), _mul(c, st.diag1), _mul(c, st.diag2))


def _factor_moments(fa, fb):
  """`E[Π fa Π fb]` and the NTK of the factors' own gradients relative to it.

  Returns (moment, ntk_of_factors) where ntk_of_factors multiplies `E[φψ]`.
  Factors of the same leaf on both sides are one random variable: E = μ² + v.
  """
  moment, ntk = 1.0, 0.0
  la = {id(p.leaf): p for p in fa}
  lb = {id(p.leaf): p for p in fb}
  if len(la) != len(fa) or len(lb) != len(fb):
    raise UnsupportedValueError('a parameter multiplies the same value twice; not supported yet.')
  shared = []
  for k, p in la.items():
    if k in lb:
      q = lb[k]
      e = p.param.scale * q.param.scale * (p.leaf.mean ** 2 + p.leaf.var)
      shared.append((p, q, e))
      moment *= e
    else:
      moment *= p.mean
  for k, q in lb.items():
    if k not in la:
      moment *= q.mean
  # d/dp of Π factors on each side, paired: w·c·c'·Π_{others}.
  for p, q, e in shared:
    rest = _product_without(fa, fb, p.leaf)
    ntk += p.leaf.ntk_weight * p.param.scale * q.param.scale * rest
  return moment, ntk


def _product_without(fa, fb, leaf):
  m = 1.0
  la = {id(p.leaf): p for p in fa if p.leaf is not leaf}
  lb = {id(p.leaf): p for p in fb if p.leaf is not leaf}
  for k, p in la.items():
    m *= (p.param.scale * lb[k].param.scale * (p.leaf.mean ** 2 + p.leaf.var)) if k in lb else p.mean
  for k, q in lb.items():
    if k not in la:
      m *= q.mean
  return m


#: The most nodes a tensor Gauss–Hermite rule may have per kernel entry.
_MAX_GRID = 4096


def _exact_degree(fa: Chain, na: int, fb: Optional[Chain] = None, nb: int = 0):
  """Nodes per dimension of a tensor Gauss–Hermite rule that integrates
  `fa·fb` (polynomials of total degrees p_a, p_b in their na + nb Gaussians)
  exactly, `⌊(p_a + p_b)/2⌋ + 1`; None where a chain is not a polynomial or
  the grid would exceed `_MAX_GRID` nodes (then the quasi-Monte Carlo rule)."""
  pa = polynomial_degree(fa, na)
  pb = 0 if fb is None else polynomial_degree(fb, nb)
  if pa is None or pb is None:
    return None
  degree = (pa + pb) // 2 + 1
  return degree if degree ** (na + nb) <= _MAX_GRID else None


def _arg_derivative_moment(fa, i, aa, fb, j, ab, ma, mb, va, vb, cov):
  """`E[∂φ/∂(input i) · ∂ψ/∂(input j)]`: the derivative chains' closed forms
  where they are recognised, else quadrature of the derivatives by autodiff."""
  da, db = derivative(fa, i), derivative(fb, j)
  if da is not None and db is not None:
    return _constant_folded(gaussian_engine.expect_pair, da, aa, db, ab, ma, mb, va, vb, cov,
                            ntk=False)[0]
  return _constant_folded(gaussian_engine.expect_pair_fn, _input_derivative(fa, i), aa,
                          _input_derivative(fb, j), ab, ma, mb, va, vb, cov)


def _input_derivative(chain: Chain, i: int):
  """∂φ/∂(input i) of `φ(u, *args)` as a callable of the same arguments:
  input 0 is `u`, input `k ≥ 1` the chain's argument `k − 1` (the further
  Gaussians, then the parameter arguments, then deterministic arrays)."""
  def d(*inputs):
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in inputs))
    inputs = [jnp.broadcast_to(a, shape) for a in inputs]
    f = lambda xi: jnp.sum(chain(*(inputs[:i] + [xi] + inputs[i + 1:])))
    return jax.grad(f)(inputs[i])
  return d


def _embed_block(arr, nb: int, sa_sp, sb_sp, a_sp, b_sp, diag=False):
  """Embeds a `(*batch[nb], *sa_sp, *sb_sp)` block into `(*batch, *a_sp, *b_sp)` layout
  (one copy of the spatial axes in diagonal mode)."""
  if isinstance(arr, float) or (tuple(sa_sp) == tuple(a_sp) and tuple(sb_sp) == tuple(b_sp)):
    return arr
  # Source axes of size one that the destination no longer has (squeezed by a
  # reshape) are dropped first.
  sides = [(sa_sp, a_sp)] if diag else [(sa_sp, a_sp), (sb_sp, b_sp)]
  drop, offset = [], nb
  for src_sp, dst_sp in sides:
    drop += [offset + i for i, r in enumerate(src_sp) if r not in dst_sp]
    offset += len(src_sp)
  if drop:
    arr = jnp.squeeze(arr, axis=tuple(drop))
    sa_sp = tuple(r for r in sa_sp if r in a_sp)
    sb_sp = tuple(r for r in sb_sp if r in (a_sp if diag else b_sp))
    if tuple(sa_sp) == tuple(a_sp) and tuple(sb_sp) == tuple(b_sp):
      return arr
  if diag:
    if tuple(a_sp) != tuple(b_sp):
      raise NeedFullSpatial()
    src = tuple(r for r in sa_sp) if len(sa_sp) >= len(sb_sp) else tuple(sb_sp)
    lead = arr.shape[:nb]
    perm = list(range(nb)) + [nb + src.index(r) for r in a_sp if r in src]
    arr = jnp.transpose(arr, perm)
    it = iter(arr.shape[nb:])
    return arr.reshape(tuple(lead) + tuple(next(it) if r in src else 1 for r in a_sp))
  lead = arr.shape[:nb]
  ka = len(sa_sp)
  # Split into the two spatial halves and align each.
  src = [('a', r) for r in sa_sp] + [('b', r) for r in sb_sp]
  dst = [('a', r) for r in a_sp] + [('b', r) for r in b_sp]
  perm = list(range(nb)) + [nb + src.index(r) for r in dst if r in src]
  arr = jnp.transpose(arr, perm)
  shape = list(lead)
  it = iter(arr.shape[nb:])
  for r in dst:
    shape.append(next(it) if r in src else 1)
  del ka
  return arr.reshape(shape)


def _concat_parts(a: Wide, b: Wide):
  """`(n_k / n, a_k, b_k)` for two values concatenated from matching channel blocks."""
  if not (isinstance(a, ChannelConcat) and isinstance(b, ChannelConcat)
          and [p.width for p in a.parts] == [p.width for p in b.parts]):
    raise UnsupportedValueError(
        'a value concatenated along its channel axis meets another value whose channels '
        'are not concatenated from blocks of the same sizes (for example a residual sum of '
        'a concatenation and a single branch); this is not supported yet.')
  return zip(a.fractions, a.parts, b.parts)


def _equal_positions(block, lead: int, k: int):
  """`(*lead, *S, *S)` → `(*lead, *S)`: the entries at equal spatial positions."""
  if isinstance(block, float) or k == 0:
    return block
  b, s = 'xyz'[:lead], 'abcdefghij'[:k]
  return jnp.einsum(f'{b}{s}{s}->{b}{s}', block)
