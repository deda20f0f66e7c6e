"""Closed-form Gaussian moments of recognised elementwise chains.

`recognise` reads a `Chain` by abstract interpretation into a *form*, one of:

  affine  a·u + c0                                 (identity, constants)
  hom1    A·min(u, 0) + B·max(u, 0) + c0           (relu, leaky_relu, abs, NT's
                                                    ABRelu: degree-1 homogeneous)
  hom0    A·1[u<0] + B·1[u>0] + Z·1[u=0] + c0      (sign, steps: degree 0)
  erf     α·erf(a·u) + c0
  cos     α·cos(a·u + b) + c0                      (sin(x) = cos(x - π/2))
  exp     α·exp(a·u + b) + c0
  other   anything else (left to quadrature)

Coefficients are NumPy values when they follow from the chain's constants
alone (so that tests such as "is this offset zero" are static) and JAX arrays
when they involve per-input arguments; either broadcasts against the output.

The pair moments `pair_moments` and single moments `single_moments` below are
exact; every formula is written in scale-free form (standard deviations times
a function of the correlation) so that large variances do not overflow in
float32, and every function of the correlation has a derivative that stays
finite at correlation ±1 (custom JVPs, as Neural Tangents does for arccos).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf as _erf, ndtr as _ndtr

from infwidth.domain.chain import Chain

_TWO_PI = 2 * math.pi
# Multiplying by 1/(2π) rather than dividing by 2π: XLA keeps divisions by
# constants, and a vector division costs several multiplications.
_INV_TWO_PI = 1 / _TWO_PI
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)

# ----------------------------------------------------------------------------
# Fast and accurate arccos.

# Abramowitz & Stegun 4.4.46: arccos(x) = sqrt(1 - x)·Σ a_k x^k on [0, 1],
# absolute error ≤ 2e-8 (below float32 resolution of values near π/2).
_AS_4_4_46 = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046,
              0.0308918810, -0.0170881256, 0.0066700901, -0.0012624911)


def _horner(coefs, x):
  """Σ_k coefs[k]·x^k."""
  out = jnp.asarray(coefs[-1], x.dtype)
  for c in coefs[-2::-1]:
    out = out * x + jnp.asarray(c, x.dtype)
  return out


def fast_arccos(x: jax.Array) -> jax.Array:
  """arccos(x) for x in [-1, 1] by A&S 4.4.46; float32-accurate, any shape.

  About 3x cheaper than `jnp.arccos` on XLA:CPU (see benchmarks/bench_arccos.py).
  """
  ax = jnp.abs(x)
  r = jnp.sqrt(jnp.maximum(1 - ax, 0)) * _horner(_AS_4_4_46, ax)
  return jnp.where(x < 0, jnp.asarray(math.pi, x.dtype) - r, r)


# ----------------------------------------------------------------------------
# Functions of the correlation with derivatives finite at |ρ| = 1.

@jax.custom_jvp
def safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(max(x, 0)) with derivative 0 (not ∞) at x ≤ 0 (NT's `_sqrt`)."""
  return jnp.sqrt(jnp.maximum(x, 0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
  x, = primals
  dx, = tangents
  y = safe_sqrt(x)
  return y, jnp.where(x > 0, dx / (2 * jnp.where(x > 0, y, 1)), 0)


# √(1-a²) - a·arccos(a) = (1-a)^{3/2}·R(a) on [0, 1], with R smooth (R(0) = 1,
# R(1) = 2√2/3): Chebyshev interpolation of degree 6, relative error ≤ 2e-8
# (7e-8 evaluated in float32). With it the degree-1 arc-cosine kernel needs the
# one square root arccos already takes, not a second for √(1-ρ²), and stays
# accurate where J1 vanishes (benchmarks/bench_arccos.py times both forms).
_J1_R = (0.9999999821, -0.07079455766, 0.01877621018, -0.007554756387,
         0.003378330698, -0.001230627844, 0.0002344713665)
# The same polynomials divided by 2π: the arc-cosine kernels' 1/(2π) costs no
# multiplication per pair.
_AS_4_4_46_OVER_2PI = tuple(c * _INV_TWO_PI for c in _AS_4_4_46)
_J1_R_OVER_2PI = tuple(c * _INV_TWO_PI for c in _J1_R)


@jax.custom_jvp
def arc_cosine(rho: jax.Array) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(J1(ρ), J1(-ρ), J0(ρ), J0(-ρ)) sharing one arccos; derivatives finite at |ρ| = 1.

  J1(ρ) = (√(1-ρ²) + ρ(π - arccos ρ))/(2π) = E[relu(u) relu(v)] and
  J0(ρ) = (π - arccos ρ)/(2π) = P(u > 0, v > 0) for unit-variance (u, v)
  (Cho & Saul 2009, arc-cosine kernels of degree 1 and 0). ρ is snapped as
  `correlation` does (±1 within a few ulps of it, or beyond).
  """
  if jnp.finfo(rho.dtype).bits > 32:
    return arc_cosine_by_arccos(_snap_to_unit(rho), jnp.arccos)
  return arc_cosine_one_root(rho)


def arc_cosine_by_arccos(rho, acos=jnp.arccos):
  """`arc_cosine` as written above, with the given arccos (float64), ρ in [-1, 1]."""
  a = acos(-rho)                      # π - arccos(ρ)
  b = jnp.asarray(math.pi, rho.dtype) - a
  s = jnp.sqrt(jnp.maximum(1 - rho * rho, 0))
  return ((s + rho * a) * _INV_TWO_PI, (s - rho * b) * _INV_TWO_PI, a * _INV_TWO_PI,
          b * _INV_TWO_PI)


def arc_cosine_one_root(rho):
  """`arc_cosine` with one square root, to float32 accuracy (relative error ≤ 3e-7).

  With r = |ρ| (snapped) and t = √(1-r): arccos(r) = t·P(r) (A&S 4.4.46), and
  2π·J1(±ρ) = t³·R(r) + π·max(±ρ, 0) (for both signs: √(1-ρ²) - r·arccos(r),
  plus π·r when that sign of ρ is positive).
  """
  r = _snapped_abs(rho)
  t2 = 1 - r
  t = jnp.sqrt(t2)
  acos_r = t * _horner(_AS_4_4_46_OVER_2PI, r)          # arccos(r)/(2π)
  tail = t2 * t * _horner(_J1_R_OVER_2PI, r)
  half = jnp.asarray(0.5, rho.dtype)
  pos = rho > 0
  half_r = half * r
  zero = jnp.zeros_like(r)
  return (tail + jnp.where(pos, half_r, zero),
          tail + jnp.where(pos, zero, half_r),
          jnp.where(pos, half - acos_r, acos_r),            # (π - arccos ρ)/(2π)
          jnp.where(pos, acos_r, half - acos_r))            # arccos(ρ)/(2π), not ½ - J0


@arc_cosine.defjvp
def _arc_cosine_jvp(primals, tangents):
  rho, = primals
  drho, = tangents
  j1p, j1m, j0p, j0m = out = arc_cosine(rho)
  r = _snapped_abs(rho)
  inside = r < 1
  dj0 = jnp.where(inside, drho / (_TWO_PI * jnp.sqrt(jnp.where(inside, 1 - r * r, 1))), 0)
  return out, (j0p * drho, -j0m * drho, dj0, -dj0)


#: |ρ| within this many ulps of 1 is taken as ±1 (see `_snap_to_unit`).
_RHO_SNAP_ULPS = 16


def _snap_band(dtype):
  return 1 - _RHO_SNAP_ULPS * jnp.finfo(dtype).eps


@jax.custom_jvp
def _snap_to_unit(rho: jax.Array) -> jax.Array:
  """ρ clipped to [-1, 1], and ±1 where |ρ| is within a few ulps of 1; derivative 1.

  The same input in both batches has ρ = 1, but its cross moment and its
  variances come from different reductions (a Gram matrix, a row-wise dot)
  that round differently; the ReLU family's J0 is √-sensitive there
  (arccos(1 - ε) ≈ √(2ε)), so one ulp of ρ cost 3e-4 of the float32 NTK per
  layer. Within the band ρ is not resolved by the arithmetic anyway. The
  derivative is kept (jnp.clip would halve it at ρ = ±1).
  """
  return jnp.where(jnp.abs(rho) >= _snap_band(rho.dtype), jnp.sign(rho), rho)


@_snap_to_unit.defjvp
def _snap_to_unit_jvp(primals, tangents):
  return _snap_to_unit(primals[0]), tangents[0]


def _snapped_abs(rho):
  """|snapped ρ|, in fewer operations than `abs(_snap_to_unit(rho))`."""
  r = jnp.abs(rho)
  return jnp.where(r >= _snap_band(rho.dtype), jnp.ones_like(r), r)


def correlation(var1, var2, cov, snap: bool = True) -> Tuple[Any, Any, Any]:
  """(sd1, sd2, ρ) with ρ = cov/(sd1·sd2) in [-1, 1] (±1 within a few ulps;
  unless not `snap`), 0 where a sd is 0."""
  s1, s2 = safe_sqrt(var1), safe_sqrt(var2)
  # sd1·sd2 rather than sqrt(var1·var2): no overflow or underflow of the
  # product, and one square root per input instead of one per pair; the ulp
  # it may cost on the diagonal is inside the snap band.
  den = s1 * s2
  ok = den > 0
  rho = jnp.where(ok, cov / jnp.where(ok, den, 1), 0)
  return s1, s2, _snap_to_unit(rho) if snap else rho


# ----------------------------------------------------------------------------
# Forms and their recognition.

def _static(x) -> bool:
  return not isinstance(x, jax.Array)


def _lib(*xs):
  return np if all(_static(x) for x in xs) else jnp


def is_static_zero(x) -> bool:
  """Whether `x` is known at trace time to be zero everywhere."""
  return _static(x) and bool(np.all(np.asarray(x) == 0))


def _where(c, x, y):
  return _lib(c, x, y).where(c, x, y)


@dataclasses.dataclass(frozen=True, eq=False)
class Form:
  """A recognised chain: `kind` and its coefficients `c` (see module docstring)."""
  kind: str
  c: Tuple[Any, ...] = ()
  c0: Any = 0.0

  def scaled(self, k) -> 'Form':
    if self.kind in ('other', 'pred'):
      return OTHER
    if self.kind in ('affine', 'hom1', 'hom0'):
      return Form(self.kind, tuple(x * k for x in self.c), self.c0 * k)
    alpha, *rest = self.c
    return Form(self.kind, (alpha * k, *rest), self.c0 * k)

  def shifted(self, d) -> 'Form':
    if self.kind in ('other', 'pred'):
      return OTHER
    return Form(self.kind, self.c, self.c0 + d)

  @property
  def is_const(self) -> bool:
    return self.kind == 'affine' and is_static_zero(self.c[0])

  def as_hom1(self) -> Optional['Form']:
    """As A·min(u,0) + B·max(u,0) + c0, if it is of that family."""
    if self.kind == 'affine':
      return Form('hom1', (self.c[0], self.c[0]), self.c0)
    if self.kind == 'hom1':
      return self
    return None

  def as_hom0(self) -> Optional['Form']:
    """As A·1[u<0] + B·1[u>0] + Z·1[u=0] with the offset folded in, if it is."""
    if self.is_const:
      return Form('hom0', (self.c0, self.c0, self.c0), 0.0)
    if self.kind == 'hom0':
      a, b, z = self.c
      return Form('hom0', (a + self.c0, b + self.c0, z + self.c0), 0.0)
    return None


OTHER = Form('other')
IDENTITY = Form('affine', (1.0,), 0.0)


def _const(v) -> Form:
  return Form('affine', (0.0,), v)


def _hom1_zero(f: Form) -> Optional[Form]:
  h = f.as_hom1()
  if h is None or not is_static_zero(h.c0):
    return None
  return h


def _add(x: Form, y: Form) -> Form:
  if x.is_const:
    return y.shifted(x.c0)
  if y.is_const:
    return x.shifted(y.c0)
  if x.kind == 'affine' and y.kind == 'affine':
    return Form('affine', (x.c[0] + y.c[0],), x.c0 + y.c0)
  hx, hy = x.as_hom1(), y.as_hom1()
  if hx is not None and hy is not None:
    return Form('hom1', (hx.c[0] + hy.c[0], hx.c[1] + hy.c[1]), hx.c0 + hy.c0)
  if x.kind == 'hom0' and y.kind == 'hom0':
    return Form('hom0', tuple(a + b for a, b in zip(x.c, y.c)), x.c0 + y.c0)
  return OTHER


def _extremum(x: Form, y: Form, is_max: bool) -> Form:
  hx, hy = _hom1_zero(x), _hom1_zero(y)
  if hx is None or hy is None:
    return OTHER
  (a1, b1), (a2, b2) = hx.c, hy.c
  lib = _lib(a1, b1, a2, b2)
  # On u < 0 the larger of A1·u, A2·u has the smaller coefficient.
  if is_max:
    return Form('hom1', (lib.minimum(a1, a2), lib.maximum(b1, b2)), 0.0)
  return Form('hom1', (lib.maximum(a1, a2), lib.minimum(b1, b2)), 0.0)


def _compare(x: Form, y: Form, strict: bool) -> Form:
  """x > y (strict) or x >= y as a predicate (N, P, Z) on u<0, u>0, u=0."""
  d = _add(x, y.scaled(-1))
  h = _hom1_zero(d)
  if h is None:
    return OTHER
  a, b = h.c
  if strict:
    return Form('pred', (a < 0, b > 0, False))
  return Form('pred', (a <= 0, b >= 0, True))


def _select(pred: Form, x0: Form, x1: Form) -> Form:
  if pred.kind != 'pred':
    return OTHER
  n, p, z = pred.c
  h0, h1 = _hom1_zero(x0), _hom1_zero(x1)
  if h0 is not None and h1 is not None:
    return Form('hom1', (_where(n, h1.c[0], h0.c[0]), _where(p, h1.c[1], h0.c[1])), 0.0)
  s0, s1 = x0.as_hom0(), x1.as_hom0()
  if s0 is not None and s1 is not None:
    return Form('hom0', tuple(_where(c, b, a) for c, a, b in zip((n, p, z), s0.c, s1.c)), 0.0)
  return OTHER


def _unary_of_affine(kind: str, x: Form, alpha=1.0, shift=0.0, c0=0.0) -> Form:
  if x.kind != 'affine':
    return OTHER
  if kind == 'erf':
    if not is_static_zero(x.c0):
      return OTHER
    return Form('erf', (alpha, x.c[0]), c0)
  return Form(kind, (alpha, x.c[0], x.c0 + shift), c0)


def _eval_const(prim, params, forms) -> Form:
  vals = [f.c0 for f in forms]
  vals = jnp.broadcast_arrays(*[jnp.asarray(v) for v in vals])
  params = dict(params)
  if 'new_dtype' in params and jnp.issubdtype(params['new_dtype'], jnp.floating):
    params.pop('new_dtype')
    return _const(vals[0].astype(jnp.result_type(float)))
  return _const(prim.bind(*vals, **params))


def recognise(chain: Chain, args: Tuple = ()) -> Form:
  """The form of φ(u, *args) = chain(u, *args), or `OTHER`."""
  forms = []
  for nd in chain.nodes:
    ops = []
    for r in nd.operands:
      if r.kind == 'u':
        ops.append(IDENTITY)
      elif r.kind == 'arg':
        ops.append(_const(args[r.index]))
      elif r.kind == 'const':
        ops.append(_const(np.asarray(r.value)[()]))
      else:
        ops.append(forms[r.index])
    forms.append(_apply(nd.prim, dict(nd.params), ops))
  return forms[-1] if forms else IDENTITY


def _apply(prim, params, ops) -> Form:
  if any(o.kind == 'other' for o in ops):
    return OTHER
  if all(o.is_const for o in ops):
    return _eval_const(prim, params, ops)
  rule = FORM_RULES.get(prim)
  return OTHER if rule is None else rule(ops, params)


#: `primitive -> rule(ops, params) -> Form`: how each elementwise primitive
#: maps the forms of its operands (not all constant, none `other`). Filled by
#: the primitives' registrations (`infwidth.rules.elementwise`); a primitive
#: without a rule makes the chain `other` (quadrature).
FORM_RULES: Dict[Any, Callable[..., Form]] = {}


def cast_form(ops, params) -> Form:
  """convert_element_type and copy: the same form (a predicate becomes its step)."""
  x = ops[0]
  new_dtype = params.get('new_dtype')
  if new_dtype is None:  # copy
    return x
  if x.kind == 'pred':
    if not jnp.issubdtype(new_dtype, jnp.floating):
      return OTHER
    return Form('hom0', tuple(np.asarray(c, float) if _static(c) else c.astype(float)
                              for c in x.c), 0.0)
  if not jnp.issubdtype(new_dtype, jnp.floating):
    return OTHER
  return x


def neg_form(ops, params) -> Form:
  return ops[0].scaled(-1)


def add_form(ops, params) -> Form:
  return _add(*ops)


def sub_form(ops, params) -> Form:
  return _add(ops[0], ops[1].scaled(-1))


def mul_form(ops, params) -> Form:
  a, b = ops
  if a.is_const:
    return b.scaled(a.c0)
  if b.is_const:
    return a.scaled(b.c0)
  return OTHER


def div_form(ops, params) -> Form:
  a, b = ops
  return a.scaled(1 / b.c0) if b.is_const else OTHER


def max_form(ops, params) -> Form:
  return _extremum(*ops, is_max=True)


def min_form(ops, params) -> Form:
  return _extremum(*ops, is_max=False)


def clamp_form(ops, params) -> Form:
  lo, v, hi = ops
  return _extremum(_extremum(v, lo, True), hi, False)


def abs_form(ops, params) -> Form:
  h = _hom1_zero(ops[0])
  if h is None:
    return OTHER
  lib = _lib(*h.c)
  return Form('hom1', (-lib.abs(h.c[0]), lib.abs(h.c[1])), 0.0)


def sign_form(ops, params) -> Form:
  h = _hom1_zero(ops[0])
  if h is None:
    return OTHER
  lib = _lib(*h.c)
  return Form('hom0', (-lib.sign(h.c[0]), lib.sign(h.c[1]), 0.0), 0.0)


def gt_form(ops, params) -> Form:
  return _compare(ops[0], ops[1], True)


def ge_form(ops, params) -> Form:
  return _compare(ops[0], ops[1], False)


def lt_form(ops, params) -> Form:
  return _compare(ops[1], ops[0], True)


def le_form(ops, params) -> Form:
  return _compare(ops[1], ops[0], False)


def select_form(ops, params) -> Form:
  return _select(*ops) if len(ops) == 3 else OTHER


def erf_form(ops, params) -> Form:
  return _unary_of_affine('erf', ops[0])


def erfc_form(ops, params) -> Form:
  return _unary_of_affine('erf', ops[0], alpha=-1.0, c0=1.0)


def cos_form(ops, params) -> Form:
  return _unary_of_affine('cos', ops[0])


def sin_form(ops, params) -> Form:
  return _unary_of_affine('cos', ops[0], shift=-math.pi / 2)


def exp_form(ops, params) -> Form:
  return _unary_of_affine('exp', ops[0])


# ----------------------------------------------------------------------------
# Single moments.

def _split_mean(m, s):
  """t = m/s where s > 0, else ±∞·sign(m) replaced by a finite stand-in."""
  ok = s > 0
  t = jnp.where(ok, m / jnp.where(ok, s, 1), 0)
  return ok, t


def single_moments(f: Form, mean, sd) -> Optional[Tuple[Any, Any, Any]]:
  """(E f(u), E f'(u), E[(u - m) f(u)]) for u ~ N(mean, sd²), or None.

  The third entry is what Stein's lemma turns into a cross-moment with an
  affine function: E[f(u)·v] = m_v E f(u) + (cov/sd²)·E[(u - m) f(u)].
  It is returned divided by nothing, so sd = 0 needs no special case.
  """
  m = mean
  s = sd
  if f.kind == 'affine':
    a, = f.c
    return a * m + f.c0, a + 0 * s, a * s * s
  if f.kind == 'hom1':
    a, b = f.c
    ok, t = _split_mean(m, s)
    pdf = _INV_SQRT_2PI * jnp.exp(-t * t / 2)
    cdf = _ndtr(t)
    # E[max(u, 0)] = m·Φ(m/s) + s·φ(m/s); min(u, 0) = u - max(u, 0).
    pos = jnp.where(ok, m * cdf + s * pdf, jnp.maximum(m, 0))
    p_pos = jnp.where(ok, cdf, jnp.where(m > 0, 1., jnp.where(m < 0, 0., 0.5)))
    e = a * (m - pos) + b * pos + f.c0
    de = a * (1 - p_pos) + b * p_pos
    # E[(u-m) f(u)] = s²·E f'(u) for f continuous (Stein's lemma).
    return e, de, s * s * de
  if f.kind == 'hom0':
    a, b, z = f.c
    ok, t = _split_mean(m, s)
    cdf = _ndtr(t)
    e = jnp.where(ok, a * (1 - cdf) + b * cdf,
                  jnp.where(m > 0, b, jnp.where(m < 0, a, z))) + f.c0
    # E[(u-m)·1[u>0]] = s·φ(m/s).
    zf = jnp.where(ok, (b - a) * s * _INV_SQRT_2PI * jnp.exp(-t * t / 2), 0)
    return e, 0 * e, zf
  if f.kind == 'erf':
    alpha, a = f.c
    r = jnp.sqrt(1 + 2 * a * a * s * s)
    # E erf(a·u) = erf(a·m / sqrt(1 + 2a²s²)) (Gaussian convolution of erf).
    e = alpha * _erf(a * m / r) + f.c0
    de = alpha * a * (2 / math.sqrt(math.pi)) * jnp.exp(-(a * m / r) ** 2) / r
    return e, de, s * s * de
  if f.kind in ('cos', 'exp'):
    alpha, a, b = f.c
    mu, var = a * m + b, a * a * s * s
    if f.kind == 'cos':
      damp = jnp.exp(-var / 2)
      e = alpha * jnp.cos(mu) * damp + f.c0
      de = -alpha * a * jnp.sin(mu) * damp
    else:
      e0 = alpha * jnp.exp(mu + var / 2)
      e, de = e0 + f.c0, a * e0
    return e, de, s * s * de
  return None


# ----------------------------------------------------------------------------
# Pair moments.

_HOM = ('hom1', 'hom0')


def _offset_terms(f: Form, g: Form, t, m1, m2, s1, s2):
  """E[(f+c)(g+d)] = E[fg] + d·E f + c·E g + c·d, from t = E[fg] of the offset-free parts."""
  if is_static_zero(f.c0) and is_static_zero(g.c0):
    return t
  ef = single_moments(Form(f.kind, f.c), m1, s1)[0]
  eg = single_moments(Form(g.kind, g.c), m2, s2)[0]
  return t + g.c0 * ef + f.c0 * eg + f.c0 * g.c0


def _hom_pair(f: Form, g: Form, s1, s2, rho, ntk: bool, raw_rho=None):
  """Zero-mean pairs in the hom1/hom0 families (Cho & Saul 2009, arc-cosine kernels).

  `raw_rho`: ρ before snapping, which `arc_cosine` snaps at less cost.
  """
  (a1, b1), (a2, b2) = f.c[:2], g.c[:2]
  same = b1 * b2 + a1 * a2
  diff = b1 * a2 + a1 * b2
  j1p, j1m, jp, jm = arc_cosine(rho if raw_rho is None else raw_rho)

  def combine(p, q, minus=False):
    # same·p ± diff·q, skipping statically zero terms (relu: diff = 0).
    terms = [] if is_static_zero(same) else [same * p]
    if not is_static_zero(diff):
      terms.append(-diff * q if minus else diff * q)
    return sum(terms[1:], terms[0]) if terms else 0 * p

  if f.kind == 'hom1' and g.kind == 'hom1':
    # max(u,0) = u⁺, min(u,0) = -(-u)⁺ and (u, -v) has correlation -ρ:
    # E[f g] = s1 s2 [(B1B2 + A1A2) J1(ρ) - (B1A2 + A1B2) J1(-ρ)].
    t = s1 * s2 * combine(j1p, j1m, minus=True)
    # f' = A·1[u<0] + B·1[u>0]: E[f'g'] = (B1B2 + A1A2) J0(ρ) + (B1A2 + A1B2) J0(-ρ).
    return t, combine(jp, jm) if ntk else None
  if f.kind == 'hom0' and g.kind == 'hom0':
    t = combine(jp, jm)
    # At zero variance u ≡ 0 takes the value Z.
    z1, z2 = f.c[2], g.c[2]
    h1, h2 = (a1 + b1) / 2, (a2 + b2) / 2
    t = jnp.where(s1 > 0, jnp.where(s2 > 0, t, z2 * h1), jnp.where(s2 > 0, z1 * h2, z1 * z2))
    return t, (0 * t) if ntk else None
  if f.kind == 'hom0':
    # E[1[u>0]·max(v,0)] = s2 (1 + ρ)/(2√(2π)); the other sign patterns follow
    # from u → -u, v → -v (ρ → -ρ).
    k = s2 * _INV_SQRT_2PI / 2
    t = k * ((b1 * b2 - a1 * a2) * (1 + rho) + (a1 * b2 - b1 * a2) * (1 - rho))
    t = jnp.where(s1 > 0, t, f.c[2] * (b2 - a2) * s2 * _INV_SQRT_2PI)
    return t, (0 * t) if ntk else None
  t, dt = _hom_pair(g, f, s2, s1, rho, ntk, raw_rho)
  return t, dt


# Gauss–Legendre nodes on [0, 1] for the bivariate normal CDF (64 nodes:
# 1e-13 against SciPy over means up to 5 and |ρ| up to 1, measured).
_GL_T, _GL_W = np.polynomial.legendre.leggauss(64)
_GL_T, _GL_W = (_GL_T + 1) / 2, _GL_W / 2
# Standardised means beyond this are ±∞ for every float (Φ(±40) = 1, 0).
_BIG = 40.0


@jax.custom_jvp
def bivariate_normal_cdf(h, k, rho):
  """Φ₂(h, k; ρ) = P(x < h, y < k) for standard normals of correlation ρ.

  Sheppard's formula with r = sin θ: Φ(h)Φ(k) + (1/2π) ∫₀^{arcsin ρ}
  exp(-(h² + k² − 2hk sin θ) / (2 cos² θ)) dθ, by a 64-point Gauss–Legendre
  rule (the integrand is smooth on the interval, and flat where cos θ → 0).
  Derivatives are the closed forms (∂/∂ρ is the density), finite at |ρ| = 1.
  """
  dtype = jnp.result_type(h, k, rho)
  theta = jnp.arcsin(jnp.clip(rho, -1, 1))[..., None] * jnp.asarray(_GL_T, dtype)
  hh, kk = jnp.asarray(h)[..., None], jnp.asarray(k)[..., None]
  c2 = jnp.cos(theta) ** 2
  f = jnp.exp(-(hh * hh + kk * kk - 2 * hh * kk * jnp.sin(theta)) / (2 * c2))
  integral = jnp.sum(jnp.asarray(_GL_W, dtype) * f, -1) * jnp.arcsin(jnp.clip(rho, -1, 1))
  return _ndtr(h) * _ndtr(k) + _INV_TWO_PI * integral


@bivariate_normal_cdf.defjvp
def _bivariate_normal_cdf_jvp(primals, tangents):
  h, k, rho = primals
  dh, dk, drho = tangents
  sigma = _safe_sigma(rho)
  pdf = lambda t: _INV_SQRT_2PI * jnp.exp(-t * t / 2)
  # ∂Φ₂/∂h = φ(h) Φ((k − ρh)/σ); ∂Φ₂/∂ρ = φ₂(h, k; ρ) = φ(h) φ((k − ρh)/σ)/σ.
  gh = pdf(h) * _ndtr((k - rho * h) / sigma)
  gk = pdf(k) * _ndtr((h - rho * k) / sigma)
  grho = pdf(h) * pdf((k - rho * h) / sigma) / sigma
  return bivariate_normal_cdf(h, k, rho), gh * dh + gk * dk + grho * drho


def _safe_sigma(rho):
  """√(1 − ρ²), kept above a tiny positive number (a step at |ρ| = 1)."""
  dtype = jnp.result_type(rho)
  floor = jnp.sqrt(jnp.finfo(dtype).eps) * 1e-3
  return jnp.maximum(safe_sqrt(1 - rho * rho), floor)


def _quadrant_moments(m1, m2, s1, s2, rho):
  """P(u > 0, v > 0), E[u⁺], E[v⁺], E[u·1(v>0)], E[v·1(u>0)] and E[u⁺ v⁺] for
  jointly Gaussian u, v with means m, standard deviations s, correlation ρ.

  With x = (u − m1)/s1, y = (v − m2)/s2, h = m1/s1, k = m2/s2 and
  R = {x > −h, y > −k} (truncated bivariate normal moments, e.g. Rosenbaum
  1961): P(R) = Φ₂(h, k; ρ),
  E[x 1_R] = φ(h) Φ((k − ρh)/σ) + ρ φ(k) Φ((h − ρk)/σ), σ = √(1 − ρ²),
  E[xy 1_R] = ρ P − ρh φ(h) Φ((k − ρh)/σ) − ρk φ(k) Φ((h − ρk)/σ)
              + σ φ(h) φ((k − ρh)/σ).
  """
  def standard(m, sd):
    ok = sd > 0
    return jnp.where(ok, jnp.clip(m / jnp.where(ok, sd, 1), -_BIG, _BIG),
                     jnp.sign(m) * _BIG)
  h, k = standard(m1, s1), standard(m2, s2)
  sigma = safe_sqrt(1 - rho * rho)
  sg = _safe_sigma(rho)
  pdf = lambda t: _INV_SQRT_2PI * jnp.exp(-t * t / 2)
  # Φ((k − ρh)/σ) and Φ((h − ρk)/σ): steps at σ = 0 (ties give ½, the limit
  # of both sides).
  ck, ch = _ndtr((k - rho * h) / sg), _ndtr((h - rho * k) / sg)
  p = bivariate_normal_cdf(h, k, rho)
  ex = pdf(h) * ck + rho * pdf(k) * ch
  ey = pdf(k) * ch + rho * pdf(h) * ck
  exy = (rho * p - rho * h * pdf(h) * ck - rho * k * pdf(k) * ch
         + sigma * pdf(h) * pdf((k - rho * h) / sg))
  pos1, pos2 = m1 * _ndtr(h) + s1 * pdf(h), m2 * _ndtr(k) + s2 * pdf(k)
  cov = rho * s1 * s2
  # Stein: E[u·1(v>0)] = m1 Φ(k) + cov φ(k)/s2 = m1 Φ(k) + ρ s1 φ(k).
  u_vpos = m1 * _ndtr(k) + rho * s1 * pdf(k)
  v_upos = m2 * _ndtr(h) + rho * s2 * pdf(h)
  both = m1 * m2 * p + m1 * s2 * ey + m2 * s1 * ex + s1 * s2 * exy
  # E[u v⁺] = m1 E[v⁺] + cov Φ(k) and E[u⁺ v] likewise (Stein).
  u_vplus = m1 * pos2 + cov * _ndtr(k)
  uplus_v = m2 * pos1 + cov * _ndtr(h)
  return dict(p=p, ph=_ndtr(h), pk=_ndtr(k), pos1=pos1, pos2=pos2, u_vpos=u_vpos,
              v_upos=v_upos, both=both, u_vplus=u_vplus, uplus_v=uplus_v,
              uplus_vpos=m1 * p + s1 * ex, vplus_upos=m2 * p + s2 * ey, uv=cov + m1 * m2)


def _hom_pair_noncentred(f: Form, g: Form, m1, m2, s1, s2, rho, ntk: bool):
  """(E[f g], E[f′ g′]) for the hom1/hom0 families of non-centred Gaussians:
  f = A·u + (B − A)·u⁺ (hom1) or A + (B − A)·1(u > 0) (hom0), through the
  quadrant moments (`_quadrant_moments`)."""
  q = _quadrant_moments(m1, m2, s1, s2, rho)
  (a1, b1), (a2, b2) = f.c[:2], g.c[:2]
  d1, d2 = b1 - a1, b2 - a2

  def steps(a, d, c, e):
    # E[(a + d·1(u>0))(c + e·1(v>0))]
    return a * c + a * e * q['pk'] + d * c * q['ph'] + d * e * q['p']

  if f.kind == 'hom1' and g.kind == 'hom1':
    t = (a1 * a2 * q['uv'] + a1 * d2 * q['u_vplus'] + d1 * a2 * q['uplus_v']
         + d1 * d2 * q['both'])
    return t, steps(a1, d1, a2, d2) if ntk else None
  if f.kind == 'hom0' and g.kind == 'hom0':
    t = steps(a1, d1, a2, d2)
    return t, (0 * t) if ntk else None
  if f.kind == 'hom0':  # g hom1: E[(a1 + d1 1(u>0))(a2 v + d2 v⁺)]
    t = (a1 * a2 * m2 + a1 * d2 * q['pos2'] + d1 * a2 * q['v_upos']
         + d1 * d2 * q['vplus_upos'])
    return t, (0 * t) if ntk else None
  t = (a2 * a1 * m1 + a2 * d1 * q['pos1'] + d2 * a1 * q['u_vpos']
       + d2 * d1 * q['uplus_vpos'])
  return t, (0 * t) if ntk else None


def affine_pair(f: Form, moments_g, mean1, sd2, cov, ntk: bool = True):
  """(E[f(u) g(v)], E[f'(u) g'(v)]) for affine f(u) = a·u + c from g's single moments.

  E[u g(v)] = m1·E g + (cov/s2²)·E[(v - m2) g(v)] (regress u on v), so
  E[f g] = a·(m1 E g + cov/s2²·E[(v - m2) g]) + c·E g and E[f' g'] = a·E g'.
  """
  eg, deg, zg = moments_g
  a, c = f.c[0], f.c0
  ok = sd2 > 0
  cross = jnp.where(ok, cov * zg / jnp.where(ok, sd2 * sd2, 1), 0)
  t = a * (mean1 * eg + cross) + c * eg
  return t, (a * deg) if ntk else None


def pair_moments(f: Form, g: Form, mean1, mean2, var1, var2, cov,
                 ntk: bool = True) -> Optional[Tuple[Any, Any]]:
  """(E[f(u) g(v)], E[f'(u) g'(v)]) in closed form, or None if none is known.

  `mean1`, `mean2` may be the Python number 0 (statically zero): the zero-mean
  families hom1, hom0, erf need it.
  """
  zero_means = is_static_zero(mean1) and is_static_zero(mean2)
  m1 = 0.0 if is_static_zero(mean1) else mean1
  m2 = 0.0 if is_static_zero(mean2) else mean2
  s1, s2, raw_rho = correlation(var1, var2, cov, snap=False)
  rho = _snap_to_unit(raw_rho)
  if f.kind == 'affine' or g.kind == 'affine':
    if f.kind != 'affine':
      return pair_moments(g, f, mean2, mean1, var2, var1, cov, ntk)
    sm = single_moments(g, m2, s2)
    return None if sm is None else affine_pair(f, sm, m1, s2, cov, ntk)
  if f.kind in _HOM and g.kind in _HOM and zero_means:
    t, dt = _hom_pair(f, g, s1, s2, rho, ntk, raw_rho)
    return _offset_terms(f, g, t, m1, m2, s1, s2), dt
  if f.kind in _HOM and g.kind in _HOM:
    t, dt = _hom_pair_noncentred(f, g, m1, m2, s1, s2, rho, ntk)
    return _offset_terms(f, g, t, m1, m2, s1, s2), dt
  if f.kind == 'erf' and g.kind == 'erf' and zero_means:
    (al1, a1), (al2, a2) = f.c, g.c
    r1 = jnp.sqrt(1 + 2 * a1 * a1 * var1)
    r2 = jnp.sqrt(1 + 2 * a2 * a2 * var2)
    # Williams (1997): E[erf(a1 u) erf(a2 v)] = (2/π) arcsin(2 a1 a2 cov / (r1 r2)),
    # r = sqrt(1 + 2a²var); |argument| < 1 always, so no clipping is needed.
    x = 2 * a1 * a2 * cov / (r1 * r2)
    t = al1 * al2 * (2 / math.pi) * jnp.arcsin(x)
    dt = al1 * al2 * a1 * a2 * (4 / math.pi) / (r1 * r2 * jnp.sqrt(1 - x * x))
    return _offset_terms(f, g, t, m1, m2, s1, s2), dt if ntk else None
  if f.kind == g.kind and f.kind in ('cos', 'exp'):
    (al1, a1, b1), (al2, a2, b2) = f.c, g.c
    mx, my = a1 * m1 + b1, a2 * m2 + b2
    vxy = a1 * a1 * var1 + a2 * a2 * var2
    cxy = a1 * a2 * cov
    if f.kind == 'cos':
      # E cos W = cos(E W)·exp(-Var W/2) for W = X ± Y; cos X cos Y = ½[cos(X+Y) + cos(X-Y)].
      plus = jnp.cos(mx + my) * jnp.exp(-(vxy + 2 * cxy) / 2)
      minus = jnp.cos(mx - my) * jnp.exp(-(vxy - 2 * cxy) / 2)
      t = al1 * al2 * (plus + minus) / 2
      # f' = -α a sin X: E[sin X sin Y] = ½[E cos(X-Y) - E cos(X+Y)].
      dt = al1 * al2 * a1 * a2 * (minus - plus) / 2
    else:
      # Lognormal: E[e^X e^Y] = exp(E X + E Y + Var(X + Y)/2).
      e = jnp.exp(mx + my + (vxy + 2 * cxy) / 2)
      t = al1 * al2 * e
      dt = al1 * al2 * a1 * a2 * e
    return _offset_terms(f, g, t, m1, m2, s1, s2), dt if ntk else None
  return None
