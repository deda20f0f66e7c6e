"""Random keys and masks: dropout in training mode (docs/semantics.md, "Dropout").

A key passed to the function is a `RandomKey`: what is derived from it
(split, fold_in, slices, wrapping) is computed on its stand-in, and
`random_bits` gives `Noise`. Elementwise maps of noise with constants (the
uniform draw, the comparison with the keep probability) and structural maps
(broadcasts, reshapes) extend it. Where it meets a wide value, a selection
(`jnp.where`, `lax.select`) or a product makes the value a product with a
mask (`NoiseSource`), independent of everything else; any other use of a
key or of noise is refused, so that the fallbacks apply.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import values as A
from infwidth.domain.chain import Chain
from infwidth.domain.errors import UnsupportedValueError
from infwidth.domain.noise import (Noise, NoiseStream, Piecewise, RandomKey, layout, resolve,
                                  merged as noise_merged)
from infwidth.domain.values import Det
from infwidth.rules import registry
from infwidth.rules.registry import register_value_kind
from infwidth.rules.wide_ops import (SeveralGaussians, add_wides, canonical_to_value,
                                   det_to_canonical, map_terms_scale, merge_roles,
                                   multiply_independent, relayout)

#: Primitives that move the entries of noise (applied to its index array).
_STRUCTURAL = ('broadcast_in_dim', 'reshape', 'squeeze', 'expand_dims', 'transpose', 'slice',
               'rev')
#: Bit manipulations of JAX's uniform draws, besides the elementwise family.
_BIT_OPS = ('shift_right_logical', 'shift_right_arithmetic', 'shift_left', 'or', 'and', 'xor',
            'not', 'bitcast_convert_type')


@register_value_kind(RandomKey)
def key_rule(ctx, *invals, **params):
  """Keys derived from a key passed to the function, computed on its stand-in;
  `random_bits` draws noise."""
  if any(not isinstance(v, (RandomKey, Det)) for v in invals):
    raise ctx.unsupported('a PRNG key passed to the function is used as data with a wide '
                          'value; only random masks drawn from it have a kernel rule')
  dets = [v.det if isinstance(v, RandomKey) else v for v in invals]
  if ctx.eqn.primitive.name == 'random_bits':
    return _draw(ctx, dets[0], params)
  return RandomKey(ctx.fold(dets))


def _draw(ctx, key: Det, params) -> Noise:
  """`random_bits(key)`: the same key and shape give the same bits (an
  array of keys, as under `vmap`, draws its own bits for each key)."""
  shape = tuple(ctx.eqn.outvars[0].aval.shape)
  width = int(params['bit_width'])
  with jax.ensure_compile_time_eval():
    data = np.asarray(jax.random.key_data(key.value))
  ident = (data.tobytes(), data.shape, shape, width)
  streams = ctx.moments.noise_streams
  if ident not in streams:
    streams[ident] = NoiseStream(shape, width, f'<random bits {len(streams)}>')
  size = int(np.prod(shape, dtype=int))
  return Noise(streams[ident], np.arange(size, dtype=np.int64 if size >= 2 ** 31 else np.int32)
               .reshape(shape))


def _scalar(v):
  """A concrete scalar constant (or a broadcast of one), else None."""
  if not isinstance(v, Det):
    return None
  c = v.compact if v.compact is not None else v.value
  if isinstance(c, jax.core.Tracer) or np.size(c) != 1:
    return None
  return np.asarray(c).reshape(())


@register_value_kind(Noise)
def noise_rule(ctx, *invals, **params):
  """Maps of noise, and noise meeting a wide value."""
  prim = ctx.eqn.primitive
  if any(isinstance(v, (A.Wide, A.ParamRef)) for v in invals):
    return _meet(ctx, invals)
  noises = [v for v in invals if isinstance(v, Noise)]
  if len(noises) != 1 or any(isinstance(v, RandomKey) for v in invals):
    raise ctx.unsupported('random values from several draws combined with each other; only '
                          'a single mask per product has a kernel rule')
  (z,) = noises
  if prim.name in _STRUCTURAL and invals[0] is z:
    index = Det(z.index, (None,) * z.index.ndim)
    return z.moved(ctx.fold([index] + list(invals[1:])).value)
  elementwise = registry.fact(prim, 'family') == 'elementwise' or prim.name in _BIT_OPS
  out_shape = tuple(ctx.eqn.outvars[0].aval.shape)
  scalars = [v if v is z else _scalar(v) for v in invals]
  if elementwise and out_shape == z.shape and all(s is not None for s in scalars):
    return z.mapped(prim, params, scalars)
  if elementwise and any(isinstance(v, Det) for v in invals):
    raise ctx.unsupported('a random mask applied to the inputs (or to values computed from '
                          'them without parameters): there is no wide axis to average it '
                          'over, so the kernel has no deterministic limit')
  raise ctx.unsupported('random bits used other than by elementwise maps with constants and '
                        'broadcasts (a random mask with a per-entry probability, for example)')


def _meet(ctx, invals):
  """A selection by a mask (`where(mask, h / keep, 0)`) or a product with
  one: a product of the value with mask functions (`NoiseSource`s)."""
  prim = ctx.eqn.primitive
  shape = tuple(ctx.eqn.outvars[0].aval.shape)
  if any(isinstance(v, (A.ParamRef, RandomKey)) for v in invals):
    raise ctx.unsupported('a random mask applied to a parameter directly')
  roles = merge_roles(shape, *[v for v in invals if isinstance(v, (A.Wide, Det))])
  if 'c' not in roles or any(isinstance(v, A.Wide) and v.hidden for v in invals):
    raise ctx.unsupported('a random mask applied to a value without a channel axis')
  noises = [v for v in invals if isinstance(v, Noise)]
  try:
    if prim is P.select_n_p and len(invals) == 3 and invals[0] is noises[0] and len(noises) == 1:
      pred, a, b = invals
      g = resolve(pred).map(float)
      if not set(g.values) <= {0.0, 1.0}:
        raise UnsupportedValueError('a selection among more than two values by random bits')
      pieces = [_times(_lift(pred, fn, roles, shape), case, roles, shape)
                for fn, case in ((g.map(lambda v: 1.0 - v), a), (g, b))]
      return _sum_or_zero(pieces, shape, roles, ctx.eqn.outvars[0].aval.dtype)
    if prim is P.mul_p and len(noises) == 1:
      z = noises[0]
      other = invals[1] if invals[0] is z else invals[0]
      return _times(_lift(z, resolve(z).map(float), roles, shape), other, roles, shape)
  except SeveralGaussians:
    raise ctx.unsupported('one random mask multiplies a value that already depends on it; '
                          'its kernel needs the moments of the mask beyond the second') from None
  raise ctx.unsupported(f'a random mask meets a wide value in `{prim}`: only products with '
                        'a mask and selections by one (dropout) have a kernel rule')


def _lift(z: Noise, fn, roles, shape) -> A.Wide:
  """The mask function `fn` of `z`'s bits as a wide value of axis `roles`."""
  batch, spatial = layout(z, roles)
  sizes = tuple(shape[roles.index(r)] for r in spatial)
  src = A.NoiseSource(z.stream, fn, batch, spatial, sizes, z.index)
  value_spatial = tuple(r for r in roles if r not in ('b', 'c', None))
  combo = A.Combo((src,), (1.0,), value_spatial, fn.mean())
  return A.Wide(tuple(shape), tuple(roles), (A.Term(Chain(), combo),))


def _times(mask: A.Wide, v, roles, shape):
  """`mask · v` for a wide or deterministic `v`; None where `v` is an exact zero."""
  if isinstance(v, A.Wide):
    return multiply_independent(mask, relayout(v, roles, shape))
  c = _scalar(v)
  if c is not None:
    return None if float(c) == 0.0 else map_terms_scale(mask, float(c))
  d = det_to_canonical(v, roles, 'a value selected by a random mask')
  if not isinstance(d, jax.core.Tracer) and not np.any(np.asarray(d)):
    return None
  return map_terms_scale(mask, d)


# ----------------------------------------------------------------------------
# Nonlinearities of masked values: a mixture over the mask's values.


def mixture(ctx, shape, vals, elementwise):
  """`φ(v₁, …)` for operands that depend on a mask `m` of one array of bits:
  `Σ_k 1[b ∈ I_k] · φ(v₁|_k, …)`, where the `I_k` are the intervals of the
  bits on which every mask function of that array is constant and `v|_k`
  is `v` with each mask replaced by its value there (docs/semantics.md,
  "Dropout"). Each `φ(v|_k)` is computed by `elementwise(ctx, shape, vals)`
  (other masks are conditioned on in turn); the indicators are independent
  of it, so each product is one term with a cofactor. None where no
  operand holds a mask directly (a pooled masked value)."""
  srcs = []
  for v in vals:
    if isinstance(v, A.Wide):
      srcs += [s for s in _noise_sources(v) if s not in srcs]
  if not srcs:
    return None
  stream = srcs[0].stream
  same = [s for s in srcs if s.stream is stream]
  if any(not s.same_layout(same[0]) for s in same):
    raise ctx.unsupported('one random mask used in two different layouts')
  starts, probs = noise_merged(*[s.fn for s in same])
  total = same[0].fn.breaks[-1]
  breaks = tuple(starts) + (total,)
  roles = next(v.roles for v in vals if isinstance(v, A.Wide))
  value_spatial = tuple(r for r in roles if r not in ('b', 'c', None))
  out = []
  for k, start in enumerate(starts):
    given = {s: s.fn.at(start) for s in same}
    cond = [_substitute(v, given, roles, shape) if isinstance(v, A.Wide) else v for v in vals]
    if all(isinstance(v, Det) for v in cond):
      piece = _fold_compact(ctx, cond, shape, roles)
    else:
      piece = elementwise(ctx, shape, cond)
    fn = Piecewise(breaks, tuple(1.0 if j == k else 0.0 for j in range(len(starts))))
    src = A.NoiseSource(stream, fn, same[0].batch, same[0].spatial, same[0].sizes,
                        same[0].index)
    indicator = A.Wide(tuple(shape), tuple(roles),
                       (A.Term(Chain(), A.Combo((src,), (1.0,), value_spatial, fn.mean())),))
    if isinstance(piece, A.Wide):
      piece = relayout(piece, roles, shape)
    out.append(_times(indicator, piece, roles, shape))
  return _sum_or_zero(out, shape, roles, ctx.eqn.outvars[0].aval.dtype)


def _sum_or_zero(pieces, shape, roles, dtype):
  """The sum of the wide values among `pieces` (None: an exact zero), or an
  exact zero for every input where there is none."""
  out = None
  for piece in pieces:
    if piece is not None:
      out = piece if out is None else add_wides(out, piece)
  if out is None:
    zero = np.zeros((1,) * len(shape), dtype)
    return Det(np.broadcast_to(zero, shape), roles, compact=zero)
  return out


def _fold_compact(ctx, dets, shape, roles) -> Det:
  """The elementwise equation on deterministic operands, kept in their
  compact (un-broadcast) forms: a per-input value stays recognisably
  constant along the channel axis, also under a trace."""
  compacts = [d.compact if d.compact is not None else d.value for d in dets]
  common = np.broadcast_shapes(*[np.shape(c) for c in compacts])
  traced = any(isinstance(c, jax.core.Tracer) for c in compacts)

  def run():
    args = [jnp.broadcast_to(jnp.asarray(c), common) for c in compacts]
    return ctx.eqn.primitive.bind(*args, **ctx.eqn.params)
  if traced:
    out = run()
    return Det(jnp.broadcast_to(out, shape), roles, compact=out)
  with jax.ensure_compile_time_eval():
    out = np.asarray(run())
  return Det(np.broadcast_to(out, shape), roles, compact=out)


def _noise_sources(w: A.Wide):
  """The mask functions a wide value holds in its combinations (not those
  inside pooled or mapped values)."""
  out = []
  for t in w.terms:
    for part in t.parts:
      for c in (part.combo,) + tuple(part.gargs) + tuple(part.pargs):
        out += [s for s in c.sources if isinstance(s, A.NoiseSource) and s not in out]
  return out


def _substitute_combo(c: A.Combo, given) -> A.Combo:
  """`c` with each mask function `s` in `given` replaced by its value there:
  its centred part `s − E[s]` becomes the constant `given[s] − E[s]`."""
  sources, coefs, mean = [], [], c.mean
  for s, k in zip(c.sources, c.coefs):
    if s in given:
      mean = A._add(mean, A._mul(k, given[s] - s.fn.mean()))
    else:
      sources.append(s)
      coefs.append(k)
  return A.Combo(tuple(sources), tuple(coefs), c.spatial, mean)


def _constant_part(part: A.Term):
  """The value of a term whose combinations hold no source (a float, or a
  canonical-layout array where it has per-input arguments)."""
  if part.chain.is_identity:
    return part.combo.mean
  args = (part.combo.mean,) + tuple(c.mean for c in part.gargs + part.pargs) + tuple(part.dargs)
  if any(isinstance(a, jax.core.Tracer) for a in args):
    return part.chain(*args)
  with jax.ensure_compile_time_eval():
    out = np.asarray(part.chain(*args))
  return float(out) if out.ndim == 0 else out


def _substitute(w: A.Wide, given, roles, shape):
  """`w` with the masks in `given` at fixed values: a wide value, or a `Det`
  where nothing random is left."""
  out, offset = None, w.offset
  for t in w.terms:
    factor, parts = 1.0, []
    for part in t.parts:
      part = dataclasses.replace(part, combo=_substitute_combo(part.combo, given),
                                 gargs=tuple(_substitute_combo(g, given) for g in part.gargs),
                                 pargs=tuple(_substitute_combo(p, given) for p in part.pargs))
      if not part.factors and not any(c.sources for c in (part.combo,) + part.gargs + part.pargs):
        factor = A._mul(factor, _constant_part(part))  # a constant now
      else:
        parts.append(part)
    if A._is_zero(factor):
      continue
    if not parts:
      offset = factor if offset is None else A._add(offset, factor)
      continue
    term = dataclasses.replace(parts[0], cofactors=tuple(parts[1:]))
    value = A.Wide(w.shape, w.roles, (term,), None, w.hidden)
    if not (isinstance(factor, float) and factor == 1.0):
      value = map_terms_scale(value, factor)
    out = value if out is None else add_wides(out, value)
  if out is None:
    arr = 0.0 if offset is None else offset
    if isinstance(arr, float):
      c = np.full((1,) * len(shape), arr)
      return Det(np.broadcast_to(c, shape), roles, compact=c)
    lead = shape[roles.index('b')] if 'b' in roles else 1
    canonical = (lead,) + tuple(n for n, r in zip(shape, roles) if r not in ('b', 'c', None))
    compact_shape = tuple(1 if r == 'c' else n for n, r in zip(shape, roles))
    xp = jnp if isinstance(arr, jax.core.Tracer) else np
    arr = xp.broadcast_to(xp.reshape(arr, xp.shape(arr) + (1,) * (len(canonical) - xp.ndim(arr))),
                          canonical)
    if xp is jnp:
      compact = canonical_to_value(arr, roles, compact_shape)
      return Det(jnp.broadcast_to(compact, shape), roles, compact=compact)
    with jax.ensure_compile_time_eval():  # constants stay concrete under a trace
      compact = np.asarray(canonical_to_value(arr, roles, compact_shape))
    return Det(np.broadcast_to(compact, shape), roles, compact=compact)
  if offset is not None:
    out = A.Wide(out.shape, out.roles, out.terms,
                 offset if out.offset is None else A._add(out.offset, offset), out.hidden)
  return out
