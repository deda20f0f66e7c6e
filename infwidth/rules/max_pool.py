"""Max pooling: the maximum of a wide value over windows of positions
(`reduce_window_max`, a generic `reduce_window` whose body is `max`, and
`reduce_max` over spatial axes).

Per channel, output position `o` is `max_t v(p_t(o))` over the window's
positions `p_t(o)`, `t = 0 … T−1`. A selection of positions commutes with
elementwise maps, `v(p(o)) = φ(u(p(o)))`, so each offset `t` is the operand
with every Gaussian combination replaced by its selection (a `MappedSource`
of the Gaussian combination, which stays Gaussian) and the maximum over the
offsets is one chain of `T` Gaussians per position (or more, where the
operand is itself a function of several), which the quasi-Monte Carlo rule
integrates (docs/semantics.md, "Max pooling").

Padding: XLA pads a max with its initial value (−∞ for `nn.max_pool`,
`hk.max_pool`, `reduce_window_max`), so an edge window holds fewer entries.
An offset that falls in the padding is made to read a valid position of the
same window instead: repeating an entry does not change a maximum, so edge
windows are exact whatever the sign of the value. A finite initial value `c`
is one more argument of the maximum (`max(c, …)`, as XLA computes it).
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.chain import Chain
from infwidth.domain.needs import Need
from infwidth.domain.values import Det
from infwidth.rules import elementwise as E
from infwidth.rules.conv import grid_role
from infwidth.rules.registry import register
from infwidth.rules.spatial import map_axes, mixes_positions, per_part, reduce_window_sum_like
from infwidth.rules.structural import reduced_roles
from infwidth.rules.wide_ops import NotGaussian, SeveralGaussians


def window_reads(size_in: int, size_out: int, window: int, stride: int, dilation: int,
                 pad, base_dilation: int = 1):
  """The positions each window offset reads along one axis: a list of
  tuples `reads[t][o]`, one per distinct offset, or None where some window
  lies entirely in the padding. An offset outside the operand (padding, or a
  hole of `base_dilation`) reads the first valid position of its window:
  the maximum is unchanged by the repetition (XLA semantics of a max window
  padded with −∞)."""
  rows = []
  for o in range(size_out):
    pos = []
    for t in range(window):
      p = o * stride + t * dilation - pad[0]
      ok = p % base_dilation == 0 and 0 <= p // base_dilation < size_in
      pos.append(p // base_dilation if ok else None)
    valid = [p for p in pos if p is not None]
    if not valid:
      return None
    rows.append([valid[0] if p is None else p for p in pos])
  reads = []
  for t in range(window):
    col = tuple(r[t] for r in rows)
    if col not in reads:  # an offset identical to an earlier one adds nothing
      reads.append(col)
  return reads


def _select_array(arr, spatial, picks, renamed, out_spatial):
  """A canonical-layout array `(B|1, *spatial)` at the picked positions:
  `picks[role]` is a tuple of positions (the axis stays, renamed) or an int
  (the axis goes); floats and per-channel arrays do not vary by position."""
  if isinstance(arr, (float, int, A.ChannelArray)) or arr is None:
    return arr
  take = np.take if isinstance(arr, np.ndarray) else jnp.take
  kept = []
  for i in reversed(range(len(spatial))):
    r = spatial[i]
    pick = picks.get(r)
    ax = 1 + i
    if pick is None:
      kept.append(r)
      continue
    if isinstance(pick, int):
      arr = take(arr, 0 if arr.shape[ax] == 1 else pick, axis=ax)
      continue
    if arr.shape[ax] != 1:
      arr = take(arr, np.asarray(pick), axis=ax)
    kept.append(renamed[r])
  kept = kept[::-1]
  return A.align(arr, kept, out_spatial) if tuple(kept) != tuple(out_spatial) else arr


class _Selection:
  """One window offset: the operand at the positions it reads, with every
  Gaussian combination replaced by its selection (a Gaussian mapped source)."""

  def __init__(self, ctx, w: A.Wide, picks_by_axis, out_shape, out_roles, renamed, bases):
    self.ctx, self.w, self.out_shape = ctx, w, tuple(out_shape)
    self.out_roles = tuple(out_roles)
    self.picks = {w.roles[ax]: pick for ax, pick in picks_by_axis.items()}
    self.renamed = renamed
    self.out_spatial = tuple(r for r in out_roles if r not in ('b', 'c', None))
    self.per_axis = {}
    for ax, pick in picks_by_axis.items():
      n = w.shape[ax]
      if isinstance(pick, int):
        self.per_axis[ax] = ('vec', np.eye(n)[pick])
      else:
        self.per_axis[ax] = ('mat', np.eye(n)[np.asarray(pick)])
    self._combos = {}
    # The Gaussian values mapped, shared by the offsets: their moments are
    # computed once, and every offset is a map of the same base.
    self.bases = bases

  def array(self, arr, spatial):
    return _select_array(arr, tuple(spatial), self.picks, self.renamed, self.out_spatial)

  def combo(self, c: A.Combo) -> A.Combo:
    key = c.key()
    if key not in self._combos:
      self._combos[key] = self._combo(c)
    return self._combos[key]

  def _combo(self, c: A.Combo) -> A.Combo:
    mean = self.array(c.mean, c.spatial)
    if all(not s.spatial for s in c.sources):
      # Parameters used elementwise (biases): the same at every position.
      coefs = tuple(self.array(k, c.spatial) for k in c.coefs)
      return A.Combo(c.sources, coefs, self.out_spatial, mean)
    rnd = [(s, k) for s, k in zip(c.sources, c.coefs) if s.random]
    det = [(s, k) for s, k in zip(c.sources, c.coefs) if not s.random]
    if any(s.spatial for s, _ in det):
      raise self.ctx.unsupported('max pooling of a value with a deterministic-valued '
                                 'linear map inside it')
    if any(isinstance(s, A.MappedSource) and not s.gaussian for s, _ in rnd):
      # Its entries are sums over positions of functions of Gaussians: not
      # jointly Gaussian, so the window's maximum has no Gaussian integral.
      raise self.ctx.unsupported('max pooling of a pooled (or summed over positions) '
                                 'non-Gaussian value, such as an average pool of a ReLU')
    key = c.key()
    if key not in self.bases:
      gauss = A.Combo(tuple(s for s, _ in rnd), tuple(k for _, k in rnd), c.spatial, 0.0)
      self.bases[key] = A.Wide(self.w.shape, self.w.roles, (A.Term(Chain(), gauss),))
    base = self.bases[key]
    mapped = map_axes(self.ctx, base, self.per_axis, self.out_shape).terms[0].combo
    if tuple(mapped.spatial) != self.out_spatial:
      mapped = A.Combo(mapped.sources, mapped.coefs, self.out_spatial, 0.0)
    return A.Combo(mapped.sources + tuple(s for s, _ in det),
                   mapped.coefs + tuple(self.array(k, c.spatial) for _, k in det),
                   self.out_spatial, mean)

  def term(self, t: A.Term) -> A.Term:
    sp = t.combo.spatial
    return A.Term(t.chain, self.combo(t.combo), tuple(self.combo(p) for p in t.pargs),
                  tuple(self.array(d, sp) for d in t.dargs), t.factors,
                  tuple(self.term(f) for f in t.cofactors), tuple(self.combo(g) for g in t.gargs))

  def value(self) -> A.Wide:
    w = self.w
    return A.Wide(self.out_shape, self.out_roles, tuple(self.term(t) for t in w.terms),
                  self.array(w.offset, w.spatial), ())


def _maximum(ctx, a, b, roles, shape):
  """`max(a, b)` of two wide values (or a wide value and a scalar constant `b`)."""
  if isinstance(b, A.Wide):
    vals, dets = [a, b], [None, None]
  else:
    c = np.asarray(b)
    vals, dets = [a, c], [None, c]
  try:
    try:
      return E._extend_chain(P.max_p, {}, vals, dets, roles, shape)
    except SeveralGaussians:
      return E._extend_chain(P.max_p, {}, vals, dets, roles, shape, several=True)
  except NotGaussian as e:
    raise ctx.unsupported(str(e)) from None


def _check_operand(ctx, w):
  if isinstance(w, A.ParamRef):
    raise ctx.unsupported('max pooling of a parameter')
  if w.hidden:
    raise ctx.unsupported('max pooling after flattening spatial axes into the channel axis')
  if A.channel_dependent(w):
    raise ctx.unsupported('max pooling of a value with per-channel arrays (e.g. BatchNorm '
                          'statistics with distinct entries) is not supported yet')
  if A.has_noise(w):
    raise ctx.unsupported('max pooling of a value multiplied by a random mask (dropout) is '
                          'not supported yet')


def _window_max_one(ctx, w: A.Wide, reads_by_axis, out_shape, init):
  """`max(init, max_t w[reads_t])` with `reads_by_axis[ax]` the per-axis
  lists of `window_reads` (tuples) or of single positions (an axis reduced
  away)."""
  _check_operand(ctx, w)
  out_roles, renamed = [], {}
  for ax, r in enumerate(w.roles):
    reads = reads_by_axis.get(ax)
    if reads is None:
      out_roles.append(r)
    elif not isinstance(reads[0], int):
      out_roles.append(grid_role(r, w.shape[ax], len(reads[0])))
      renamed[r] = out_roles[-1]
  axes = sorted(reads_by_axis)
  count = int(np.prod([len(reads_by_axis[a]) for a in axes], dtype=int))
  if count > E.MAX_GAUSSIANS:
    raise ctx.unsupported(
        f'a maximum over {count} positions is a function of {count} Gaussian values per '
        f'channel; kernels of functions of up to {E.MAX_GAUSSIANS} are supported; use '
        'fallback="monte_carlo"')
  out, bases = None, {}
  for combo in itertools.product(*(reads_by_axis[a] for a in axes)):
    sel = _Selection(ctx, w, dict(zip(axes, combo)), out_shape, out_roles, renamed,
                     bases).value()
    out = sel if out is None else _maximum(ctx, out, sel, tuple(out_roles), tuple(out_shape))
  if init is not None:
    out = _maximum(ctx, out, init, tuple(out_roles), tuple(out_shape))
  return out


def _init_value(ctx, init):
  """None for −∞ (the identity of max); the value for a finite constant."""
  if not isinstance(init, Det) or np.size(init.value) != 1 or not E._concrete(init.value):
    raise ctx.unsupported('a max window with a random or traced initial value')
  c = float(np.asarray(init.value).reshape(()))
  if c == -np.inf:
    return None
  if np.isnan(c) or c == np.inf:
    raise ctx.unsupported(f'a max window with initial value {c}')
  return c


def window_max(ctx, operand, init, window_dimensions, window_strides, padding, base_dilation,
               window_dilation):
  """The rule of `reduce_window_max` (and of `reduce_window` with a `max` body)."""
  if isinstance(operand, A.ParamRef):
    raise ctx.unsupported('max pooling of a parameter')
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)

  def one(w, shape):
    reads = {}
    for ax, r in enumerate(w.roles):
      trivial = (window_dimensions[ax] == 1 and window_strides[ax] == 1 and
                 tuple(padding[ax]) == (0, 0) and base_dilation[ax] == 1)
      if trivial:
        continue
      if r in ('b', 'c') or r is None:
        raise ctx.unsupported(f'max pooling along the {"batch" if r == "b" else "channel"} '
                              'axis')
      rd = window_reads(w.shape[ax], shape[ax], window_dimensions[ax], window_strides[ax],
                        window_dilation[ax], tuple(padding[ax]), base_dilation[ax])
      if rd is None:
        raise ctx.unsupported('a max window that lies entirely in the padding (its value is '
                              'the initial value −∞)')
      reads[ax] = rd
    if not reads:
      return w if init is None else _maximum(ctx, w, init, w.roles, w.shape)
    return _window_max_one(ctx, w, reads, shape, init)

  return per_part(operand, out_shape, one)


@register(P.reduce_window_max_p, family='spatial', requirement=mixes_positions,
          accepts=(A.ChannelConcat,))
def reduce_window_max_rule(ctx, operand, *, window_dimensions, window_strides, padding,
                           base_dilation, window_dilation, **_):
  return window_max(ctx, operand, None, window_dimensions, window_strides, padding,
                    base_dilation, window_dilation)


@register(P.reduce_window_p, family='spatial', body=((P.add_p,), (P.max_p,)),
          requirement=mixes_positions, accepts=(A.ChannelConcat,))
def reduce_window_rule(ctx, operand, init, *, jaxpr, consts=(), window_dimensions,
                       window_strides, padding, base_dilation, window_dilation, **_):
  """A generic `reduce_window` (a traced or non-identity initial value, or
  `jnp.add`/`jnp.maximum` as the computation): a window sum or a window max,
  by its body (the interpreter has matched it to one of the registered ones)."""
  if ctx.body == (P.max_p,):
    return [window_max(ctx, operand, _init_value(ctx, init), window_dimensions,
                       window_strides, padding, base_dilation, window_dilation)]
  return reduce_window_sum_like(ctx, operand, init, window_dimensions, window_strides,
                                padding, base_dilation, window_dilation)


def _max_requirement(eqn, out_need: Need) -> Need:
  return Need.FULL


@register(P.reduce_max_p, family='reduction', det_roles=reduced_roles,
          requirement=_max_requirement, accepts=(A.ChannelConcat,))
def reduce_max_rule(ctx, operand, *, axes, **_):
  """`jnp.max` over spatial axes (global max pooling): the maximum over all
  positions, a function of as many Gaussians as positions."""
  if isinstance(operand, A.ParamRef):
    raise ctx.unsupported('a maximum over the entries of a parameter')
  axes = tuple(a % len(operand.shape) for a in axes)
  kinds = [operand.roles[a] for a in axes]
  if 'c' in kinds:
    raise ctx.unsupported('a maximum over a wide (channel) axis: the maximum of n i.i.d. '
                          'values grows with n and has no infinite-width limit')
  if 'b' in kinds or any(r is None and operand.shape[a] != 1 for a, r in zip(axes, kinds)):
    raise ctx.unsupported('a maximum over the batch axis of a wide value')
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  reads = {a: list(range(operand.shape[a])) for a in axes}
  return per_part(operand, out_shape,
                  lambda w, shape: _window_max_one(ctx, w, reads, shape, None), dropped=axes)
