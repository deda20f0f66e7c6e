"""Elementwise primitives on wide values (DESIGN §2, kind 2).

Linear ones (add, sub, neg, multiplication and division by deterministic
values, parameters as factors) act on the terms of a wide value directly; any
other elementwise primitive extends the value's elementwise chain, so a
maximal elementwise subgraph applied to one Gaussian becomes one scalar
function φ whose expectations `infwidth.domain.gaussian` evaluates. Each
primitive's closed-form and kink rules are registered with it (`ELEMENTWISE`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as P

from infwidth.domain import closed_forms as cf
from infwidth.domain import quadrature as quad
from infwidth.domain import values as A
from infwidth.domain.errors import InternalError, UnsupportedValueError
from infwidth.domain.chain import ChainBuilder, const
from infwidth.rules.random import mixture
from infwidth.rules.registry import register
from infwidth.rules.wide_ops import (Det, NotGaussian, SeveralGaussians, add_offset, add_wides,
                                   collapse, det_to_canonical, finish_term, map_terms_scale,
                                   merge_roles, multiply_independent, param_to_wide, relayout)

_IDENTITY = (P.convert_element_type_p, P.copy_p, P.reduce_precision_p)


def _float(v: Det):
  """A Python float for a concrete scalar constant, else None."""
  return _static(v.value) if np.size(v.value) == 1 and _concrete(v.value) else None


def _static(c):
  """A canonical-layout operand as a Python float when it is a concrete scalar."""
  if isinstance(c, A.ChannelArray):
    return c
  if np.size(c) == 1 and _concrete(c):
    return float(np.asarray(c).reshape(()))
  return c


def _single_param(w: A.Wide):
  """`(source, c)` where w is `c·p` for one parameter source `p` used as is
  (a per-channel scale) and `c` is 1.0 or a per-channel array (BatchNorm's
  `scale·rsqrt(var + ε)`); else None."""
  if w.offset is not None or len(w.terms) != 1:
    return None
  t = w.terms[0]
  if not (t.is_gaussian and len(t.combo.sources) == 1
          and isinstance(t.combo.sources[0], A.ParamSource)):
    return None
  src, c, mean = t.combo.sources[0], t.combo.coefs[0], t.combo.mean
  if isinstance(c, float) and c == 1.0 and isinstance(mean, float):
    return src, 1.0
  if isinstance(c, A.ChannelArray) and isinstance(src.mean, float) and (
      (mean is c and src.mean == 1.0) or (A._is_zero(mean) and src.mean == 0.0)):
    return src, c
  return None


def elementwise_rule(ctx, *invals, **params):
  shape = tuple(ctx.eqn.outvars[0].aval.shape)
  if any(isinstance(v, (A.ChannelConcat, A.ParamConcat)) for v in invals):
    return per_block(ctx, shape, invals, params)
  return _elementwise(ctx, shape, invals, params)


def per_block(ctx, shape, invals, params):
  """A channelwise map of values concatenated along the channel axis (or of
  parameters concatenated along an axis) is the concatenation of the map of
  each block: a `ChannelConcat` (a `ParamConcat` where every block stays a
  parameter view)."""
  concat = next(v for v in invals if isinstance(v, (A.ChannelConcat, A.ParamConcat)))
  if isinstance(concat, A.ParamConcat):
    axis, widths = concat.axis, list(concat.widths)
  else:
    axis, widths = concat.channel_axis, [p.width for p in concat.parts]
  bounds = np.cumsum([0] + widths)
  parts = []
  for k, width in enumerate(widths):
    block = [slice(None)] * len(shape)
    block[axis] = slice(bounds[k], bounds[k + 1])
    args = []
    for v in invals:
      if isinstance(v, A.ChannelConcat):
        if [p.width for p in v.parts] != widths or v.channel_axis != axis:
          raise ctx.unsupported('a channelwise map of values concatenated from different '
                                'channel blocks')
        args.append(v.parts[k])
      elif isinstance(v, A.ParamConcat):
        if list(v.widths) != widths or v.axis != axis:
          raise ctx.unsupported('parameters concatenated from pieces meet a value that is not '
                                'concatenated from blocks of the same sizes along the same axis')
        args.append(v.pieces[k])
      elif isinstance(v, Det) and len(v.shape) == len(shape) and v.shape[axis] == shape[axis] > 1:
        compact = v.compact
        if compact is not None and np.shape(compact)[axis] != 1:
          compact = compact[tuple(block)]
        args.append(Det(v.value[tuple(block)], v.roles, compact))
      elif isinstance(v, Det):
        args.append(v)
      else:
        raise ctx.unsupported(
            'a channelwise map of a value concatenated along its channel axis (or of '
            'parameters concatenated) and a value that is not concatenated the same way; '
            'split the concatenation at its blocks first')
    part_shape = shape[:axis] + (width,) + shape[axis + 1:]
    if any(isinstance(a, A.DetChannels) for a in args):
      parts.append(_det_block_map(ctx, part_shape, args))
    else:
      parts.append(_elementwise(ctx, part_shape, args, params))
  return _assemble(ctx, shape, axis, parts)


def _det_block_map(ctx, shape, args) -> A.DetChannels:
  """A channelwise map of a block of deterministic channels: the map of the
  array (deterministic values give deterministic values)."""
  det = next(a for a in args if isinstance(a, A.DetChannels))
  if not all(isinstance(a, (Det, A.DetChannels)) for a in args):
    raise ctx.unsupported('an elementwise map of an array concatenated with wide values and '
                          'of a wide value at the same channels')
  vals = [Det(a.value, a.roles) if isinstance(a, A.DetChannels) else a for a in args]
  out = ctx.fold(vals)
  xp = jnp if isinstance(out.value, jax.core.Tracer) else np
  return A.DetChannels(shape, det.roles, (), value=xp.broadcast_to(out.value, shape))


def _assemble(ctx, shape, axis, parts):
  if all(isinstance(p, A.ParamRef) for p in parts):
    return A.ParamConcat(tuple(parts), shape, axis)
  if all(isinstance(p, Det) for p in parts):
    xp = jnp if any(isinstance(p.value, jax.core.Tracer) for p in parts) else np
    return Det(xp.concatenate([xp.broadcast_to(p.value, _block_shape(shape, axis, p))
                               for p in parts], axis), parts[0].roles)
  if any(not isinstance(p, A.Wide) or isinstance(p, A.ChannelConcat) or p.roles != parts[0].roles
         or p.channel_axis != axis for p in parts):
    raise ctx.unsupported('a channelwise map of concatenated blocks whose results are not '
                          'all wide values of one layout (e.g. parameters concatenated and '
                          'combined with constants only in some blocks)')
  return A.ChannelConcat(shape, parts[0].roles, (), parts=tuple(parts))


def _block_shape(shape, axis, d: Det):
  return shape[:axis] + (d.shape[axis],) + shape[axis + 1:]


def _elementwise(ctx, shape, invals, params):
  prim = ctx.eqn.primitive

  # Parameters combined only with scalar constants stay symbolic parameter views.
  if all(isinstance(v, (A.ParamRef, Det)) for v in invals) and any(isinstance(v, A.ParamRef) for v in invals):
    consts = [v for v in invals if isinstance(v, Det)]
    p = next(v for v in invals if isinstance(v, A.ParamRef))
    scalars = [_float(c) for c in consts]
    if all(s is not None for s in scalars) and shape == p.shape:
      if prim in _IDENTITY:
        return p
      if prim is P.neg_p:
        return p.scaled(-1.0)
      if prim is P.mul_p and len(scalars) == 1:
        return p.scaled(scalars[0])
      if prim is P.div_p and invals[0] is p and len(scalars) == 1:
        return p.scaled(1.0 / scalars[0])

  others = merge_roles(shape, *[v for v in invals if not isinstance(v, A.ParamRef)])
  invals = [param_to_wide(v, others) if isinstance(v, A.ParamRef) else v for v in invals]
  roles = merge_roles(shape, *invals)
  if 'c' not in roles:
    raise InternalError(f'elementwise `{prim}` result has channel roles {roles}')
  vals = []
  for v in invals:
    if isinstance(v, A.Wide):
      vals.append(relayout(v, roles, shape))
    else:
      vals.append(v)
  dets = [det_to_canonical(v, roles, f'an operand of `{prim}`', shape) if isinstance(v, Det)
          else None for v in vals]
  out = _linear(prim, vals, dets, shape, roles)
  if out is not None:
    return out
  if any(isinstance(v, A.Wide) and A.has_noise(v) for v in vals):
    # A nonlinearity of a masked value: a mixture over the mask's values.
    out = mixture(ctx, shape, vals, lambda c, s, vs: _elementwise(c, s, vs, params))
    if out is not None:
      return out
  try:
    return _extend_chain(prim, params, vals, dets, roles, shape)
  except NotGaussian as e:
    raise ctx.unsupported(str(e)) from None
  except SeveralGaussians:
    pass
  # Several Gaussian values: products of independent ones factorise (a gated
  # unit (W₁x)·σ(W₂x)); anything else is one chain of several Gaussians.
  try:
    if prim is P.mul_p and all(isinstance(v, A.Wide) for v in vals):
      return multiply_independent(*vals)
    if prim is P.select_n_p and len(vals) == 3 and isinstance(vals[0], A.Wide):
      return _select_by_indicator(vals, dets, roles, shape, ctx.eqn.outvars[0].aval.dtype)
  except SeveralGaussians:
    pass
  try:
    return _extend_chain(prim, params, vals, dets, roles, shape, several=True)
  except NotGaussian as e:
    raise ctx.unsupported(str(e)) from None


def _select_by_indicator(vals, dets, roles, shape, dtype):
  """`where(p, b, a)` with a predicate over other Gaussians than the cases:
  `a + s·(b − a)` with the indicator `s = 1[p]`, a product of independent
  values (`select_n(p, a, b)` picks `b` where `p` is true)."""
  pred, a, b = vals
  s = _extend_chain(P.convert_element_type_p, dict(new_dtype=np.dtype(dtype), weak_type=False,
                                                    sharding=None), [pred], [None], roles, shape)

  def as_wide(v, d):
    """A case as a wide value; None for a constant zero."""
    if isinstance(v, A.Wide):
      return v
    if not isinstance(d, A.ChannelArray) and _concrete(d) and not np.any(np.asarray(d) != 0):
      return None
    return add_offset(A.Wide(shape, roles, ()), d)

  wa, wb = as_wide(a, dets[1]), as_wide(b, dets[2])
  diff = wb if wa is None else (map_terms_scale(wa, -1.0) if wb is None else add_wides(wb, wa, -1.0))
  if diff is None:
    return A.Wide(shape, roles, (), jnp.zeros((1,) * (1 + len(pred.spatial))))
  out = multiply_independent(s, diff)
  return out if wa is None else add_wides(out, wa)


def _linear(prim, vals, dets, shape, roles):
  """Fast paths that keep terms Gaussian; None when the op is not linear here."""
  if prim in _IDENTITY:
    return vals[0]
  if prim is P.neg_p:
    return map_terms_scale(vals[0], -1.0)
  if prim in (P.add_p, P.sub_p):
    a, b = vals
    sign = 1.0 if prim is P.add_p else -1.0
    if isinstance(a, A.Wide) and isinstance(b, A.Wide):
      return add_wides(a, b, sign)
    if isinstance(a, A.Wide):
      return add_offset(a, sign * dets[1])
    return add_offset(map_terms_scale(b, sign), dets[0])
  if prim is P.mul_p:
    a, b = vals
    if isinstance(a, A.Wide) and isinstance(b, A.Wide):
      for w, p in ((a, b), (b, a)):
        single = _single_param(p)
        if single is not None:
          if w.offset is not None:
            return None
          src, c = single
          w = w if isinstance(c, float) else map_terms_scale(w, c)
          terms = tuple(dataclasses.replace(t, factors=t.factors + (src,)) for t in w.terms)
          return A.Wide(w.shape, w.roles, terms, None, w.hidden)
      return None
    d = dets[1] if isinstance(a, A.Wide) else dets[0]
    if not isinstance(d, A.ChannelArray) and _concrete(d) and not np.any(np.asarray(d)):
      # Times an exact zero (a loop's zero initial state): zero for every
      # input, with no random part left.
      zero = np.zeros((1,) * len(shape), np.asarray(d).dtype)
      return Det(np.broadcast_to(zero, shape), roles, compact=zero)
    return map_terms_scale(a if isinstance(a, A.Wide) else b, _static(d))
  if prim is P.div_p and isinstance(vals[0], A.Wide) and not isinstance(vals[1], A.Wide):
    c = _static(dets[1])
    return map_terms_scale(vals[0], 1.0 / c)
  return None


def _concrete(x) -> bool:
  """Whether `x` has a value now (not a tracer under jit)."""
  return not isinstance(x, jax.core.Tracer)


#: The most random Gaussian combinations one chain may take (its kernel is a
#: joint integral over twice as many: exact for low-degree polynomials,
#: quasi-Monte Carlo otherwise, `gaussian_engine`).
MAX_GAUSSIANS = 64


def _extend_chain(prim, params, vals, dets, roles, shape, several=False):
  """The chain of `prim` applied to the operands; `several`: over several
  Gaussian combinations if the operands need them (else `SeveralGaussians`)."""
  b = ChainBuilder()
  pargs, dargs = [], []
  gargs = [] if several else None
  combo = None
  refs = []
  for v, d in zip(vals, dets):
    if isinstance(v, A.Wide):
      r, combo = collapse(v, b, pargs, dargs, combo, gargs)
    elif not isinstance(d, A.ChannelArray) and np.size(d) == 1 and _concrete(d):
      r = const(np.asarray(d).reshape(()))
    else:
      r = b.new_arg()
      dargs.append((r.index, d))
    refs.append(r)
  out = b.add(prim, params, refs)
  spatial = tuple(r for r in roles if r not in ('b', 'c', None))
  hidden = next((v.hidden for v in vals if isinstance(v, A.Wide)), ())
  if gargs and 1 + len(gargs) > MAX_GAUSSIANS:
    raise UnsupportedValueError(
        f'`{prim}` makes a function of {1 + len(gargs)} different Gaussian values; kernels '
        f'of functions of up to {MAX_GAUSSIANS} (a joint integral over twice as many) are '
        'supported; use fallback="monte_carlo".')
  term = finish_term(b, out, combo, pargs, dargs, spatial + tuple(r for r, _ in hidden),
                     gargs or ())
  return A.Wide(shape, roles, (term,), None, hidden)


def defelementwise(prim, form=None, kinks=None, structured=None):
  """Registers a primitive that acts entry by entry, with its facts.

  Its kernel rule is `elementwise_rule`: linear primitives act on the terms of
  a wide value, any other extends its elementwise chain. `form` is its
  closed-form rule (`infwidth.domain.closed_forms`; None: the chain goes to
  quadrature), `kinks` where it puts kinks for quadrature
  (`infwidth.domain.quadrature`; None: smooth where its operands are).
  """
  register(prim, family='elementwise', accepts=(A.ChannelConcat,), structured=structured,
           form=form, kinks=kinks)(elementwise_rule)
  if form is not None:
    cf.FORM_RULES[prim] = form
  if kinks is not None:
    quad.KINK_RULES[prim] = kinks


#: Every elementwise primitive a chain may hold: closed-form rule, kink rule
#: and part in the structured empirical NTK (None: none / quadrature / smooth).
ELEMENTWISE = (
    # primitive                  closed form      kinks                 structured
    (P.add_p,                    cf.add_form,     quad.add_kinks,       None),
    (P.sub_p,                    cf.sub_form,     quad.sub_kinks,       None),
    (P.mul_p,                    cf.mul_form,     quad.mul_kinks,       'scale'),
    (P.div_p,                    cf.div_form,     quad.div_kinks,       'scale'),
    (P.neg_p,                    cf.neg_form,     quad.neg_kinks,       'scale'),
    (P.max_p,                    cf.max_form,     quad.extremum_kinks,  None),
    (P.min_p,                    cf.min_form,     quad.extremum_kinks,  None),
    (P.clamp_p,                  cf.clamp_form,   quad.clamp_kinks,     None),
    (P.abs_p,                    cf.abs_form,     quad.abs_kinks,       None),
    (P.sign_p,                   cf.sign_form,    quad.sign_kinks,      None),
    (P.select_n_p,               cf.select_form,  quad.select_kinks,    None),
    (P.gt_p,                     cf.gt_form,      quad.compare_kinks,   None),
    (P.ge_p,                     cf.ge_form,      quad.compare_kinks,   None),
    (P.lt_p,                     cf.lt_form,      quad.compare_kinks,   None),
    (P.le_p,                     cf.le_form,      quad.compare_kinks,   None),
    (P.eq_p,                     None,            quad.compare_kinks,   None),
    (P.ne_p,                     None,            quad.compare_kinks,   None),
    (P.and_p,                    None,            quad.logical_kinks,   None),
    (P.or_p,                     None,            quad.logical_kinks,   None),
    (P.not_p,                    None,            quad.logical_kinks,   None),
    (P.erf_p,                    cf.erf_form,     None,                 None),
    (P.erfc_p,                   cf.erfc_form,    None,                 None),
    (P.cos_p,                    cf.cos_form,     None,                 None),
    (P.sin_p,                    cf.sin_form,     None,                 None),
    (P.exp_p,                    cf.exp_form,     None,                 None),
    (P.integer_pow_p,            None,            quad.polynomial_kinks, None),
    (P.square_p,                 None,            quad.polynomial_kinks, None),
    (P.floor_p,                  None,            quad.jump_kinks,      None),
    (P.ceil_p,                   None,            quad.jump_kinks,      None),
    (P.round_p,                  None,            quad.jump_kinks,      None),
    (P.rem_p,                    None,            quad.jump_kinks,      None),
    (P.nextafter_p,              None,            quad.jump_kinks,      None),
    (P.is_finite_p,              None,            quad.jump_kinks,      None),
    (P.convert_element_type_p,   cf.cast_form,    quad.cast_kinks,      'permutation'),
    (P.copy_p,                   cf.cast_form,    quad.cast_kinks,      'permutation'),
    (P.reduce_precision_p,       None,            None,                 'permutation'),
) + tuple((prim, None, None, None) for prim in (
    # Smooth maps without a closed form: quadrature.
    P.exp2_p, P.log_p, P.log1p_p, P.expm1_p, P.tanh_p, P.logistic_p, P.erf_inv_p, P.tan_p,
    P.atan_p, P.sinh_p, P.cosh_p, P.asinh_p, P.sqrt_p, P.rsqrt_p, P.cbrt_p, P.pow_p,
    P.atan2_p) + ((P.stop_gradient_p,) if hasattr(P, 'stop_gradient_p') else ()))

for _row in ELEMENTWISE:
  defelementwise(*_row)
del _row

#: The primitives above (elementwise chains may hold only these).
CHAIN_PRIMITIVES = tuple(row[0] for row in ELEMENTWISE)
