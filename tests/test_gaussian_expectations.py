"""Gaussian expectations of elementwise chains against independent oracles.

Oracles: the arc-cosine kernels of Cho & Saul written out independently,
direct sampling of the 2-D Gaussian (10^6 pairs, fixed seed: the standard
error of a mean is std/1000 and results must lie within 5 SE), adaptive
scipy integration with closed-form conditional expectations, and the
quadrature path itself for closed forms.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from infwidth.domain import closed_forms as cf
from infwidth.rules import builtin as _builtin  # noqa: F401  (registers the forms and kinks)
from infwidth.domain import quadrature as quad
from infwidth.domain.chain import Chain
from infwidth.domain.gaussian import expect_pair, expect_single
from infwidth.interpreters.chain_interpreter import chain_from_fn

N_SAMPLES = 10**6
N_SE = 5.0
_Z = np.random.default_rng(0).standard_normal((2, N_SAMPLES))


def _user_chain(u):
  return u * jnp.tanh(u) + 0.3 * jnp.sin(2 * u)


# name -> (function, closed-form kind at zero means, derivative continuous at 0)
FUNCTIONS = {
    'relu': (jax.nn.relu, 'hom1', False),
    'leaky_relu': (jax.nn.leaky_relu, 'hom1', False),
    'abs': (jnp.abs, 'hom1', False),
    'sign': (jnp.sign, 'hom0', False),    # NTK factor 0 a.e. (derivative 0 off u = 0)
    'erf': (jax.scipy.special.erf, 'erf', True),
    'gelu_tanh': (jax.nn.gelu, 'other', True),
    'gelu_erf': (lambda u: jax.nn.gelu(u, approximate=False), 'other', True),
    'tanh': (jnp.tanh, 'other', True),
    'sigmoid': (jax.nn.sigmoid, 'other', True),
    'silu': (jax.nn.silu, 'other', True),
    'softplus': (jax.nn.softplus, 'other', True),
    'elu': (jax.nn.elu, 'other', True),
    'selu': (jax.nn.selu, 'other', False),
    'sin': (jnp.sin, 'cos', True),
    'cos_affine': (lambda u: jnp.cos(2 * u + 1), 'cos', True),
    'exp': (lambda u: jnp.exp(0.5 * u), 'exp', True),
    'relu6': (jax.nn.relu6, 'other', False),
    'hard_tanh': (jax.nn.hard_tanh, 'other', True),
    'hard_sigmoid': (jax.nn.hard_sigmoid, 'other', True),
    'clip': (lambda u: jnp.clip(u, -1.0, 2.0), 'other', True),
    'user': (_user_chain, 'other', True),
}

# Zero-mean configurations: generic, same variable (ρ = 1), ρ = -1, ρ = 0,
# zero variance (u ≡ 0), strongly correlated.
ZM_VAR1 = np.array([1.0, 2.0, 0.7, 1.2, 0.0, 3.0])
ZM_VAR2 = np.array([0.5, 2.0, 1.5, 0.8, 1.0, 3.0])
ZM_RHO = np.array([0.3, 1.0, -1.0, 0.0, 0.0, 0.9])
ZM_COV = ZM_RHO * np.sqrt(ZM_VAR1 * ZM_VAR2)
ZM_POINT_MASS = 4

# Nonzero means: generic, u = v (same variable), ρ = -1, zero variance off a kink.
M_MEAN1 = np.array([0.5, 1.0, -0.2, 0.3])
M_MEAN2 = np.array([-0.3, 1.0, 0.7, 0.0])
M_VAR1 = np.array([1.0, 1.5, 0.8, 0.0])
M_VAR2 = np.array([2.0, 1.5, 1.2, 1.0])
M_RHO = np.array([0.4, 1.0, -1.0, 0.0])
M_COV = M_RHO * np.sqrt(M_VAR1 * M_VAR2)


def _sample_moments(fn, gn, mean1, mean2, var1, var2, cov, f_args=(), g_args=()):
  """Monte Carlo (E f g, SE, E f'g', SE) per configuration (1-D arrays)."""
  mean1, mean2, var1, var2, cov = (np.broadcast_to(np.asarray(x, float), np.shape(var1))
                                   for x in (mean1, mean2, var1, var2, cov))
  s1, s2 = np.sqrt(var1), np.sqrt(var2)
  ok = s1 * s2 > 0
  rho = np.clip(np.where(ok, cov / np.where(ok, s1 * s2, 1), 0), -1, 1)
  c, d = s2 * rho, s2 * np.sqrt(1 - rho**2)

  @jax.jit
  def moments(z, f_args, g_args):
    u = mean1[:, None] + s1[:, None] * z[0]
    v = mean2[:, None] + c[:, None] * z[0] + d[:, None] * z[1]
    fa = [a[:, None] for a in f_args]
    ga = [a[:, None] for a in g_args]
    fu, dfu = jax.jvp(lambda x: fn(x, *fa), (u,), (jnp.ones_like(u),))
    gv, dgv = jax.jvp(lambda x: gn(x, *ga), (v,), (jnp.ones_like(v),))
    t, dt = fu * gv, dfu * dgv
    n = z.shape[1]
    return (t.mean(1), t.std(1) / math.sqrt(n), dt.mean(1), dt.std(1) / math.sqrt(n))
  return [np.asarray(x) for x in moments(jnp.asarray(_Z), tuple(map(jnp.asarray, f_args)),
                                         tuple(map(jnp.asarray, g_args)))]


def _assert_within_se(pred, mc, se, what, mask=None):
  pred, mc, se = (np.asarray(x, float) for x in (pred, mc, se))
  tol = N_SE * se + 1e-9 * (1 + np.abs(mc))
  bad = np.abs(pred - mc) > tol
  if mask is not None:
    bad &= mask
  assert not bad.any(), f'{what}: {pred[bad]} vs samples {mc[bad]} ± {se[bad]}'


ALL = [np.concatenate([a, b]) for a, b in ((np.zeros(6), M_MEAN1), (np.zeros(6), M_MEAN2),
                                            (ZM_VAR1, M_VAR1), (ZM_VAR2, M_VAR2), (ZM_COV, M_COV))]


def _check_against_samples(fn, gn, what, zero_mean_kinds, ntk_at_point_mass):
  """Both configuration sets against one sampling pass.

  Zero means are passed statically (closed forms where recognised) and, for
  chains left to quadrature, as arrays together with the nonzero means (one
  compilation).
  """
  f, g = chain_from_fn(fn), chain_from_fn(gn)
  mc_t, se_t, mc_dt, se_dt = _sample_moments(fn, gn, *ALL)
  closed = zero_mean_kinds != ('other', 'other')
  if closed:
    t0, dt0 = expect_pair(f, (), g, (), 0.0, 0.0, ZM_VAR1, ZM_VAR2, ZM_COV)
    t1, dt1 = expect_pair(f, (), g, (), M_MEAN1, M_MEAN2, M_VAR1, M_VAR2, M_COV)
    t, dt = np.concatenate([t0, t1]), np.concatenate([dt0, dt1])
  else:
    t, dt = expect_pair(f, (), g, (), *ALL)
  _assert_within_se(t, mc_t, se_t, f'{what} second moment')
  # Under a point mass at a kink (u ≡ 0) the derivative is a convention.
  mask = np.ones(len(ALL[0]), bool)
  mask[ZM_POINT_MASS] = ntk_at_point_mass
  _assert_within_se(dt, mc_dt, se_dt, f'{what} NTK factor', mask)


@pytest.mark.parametrize('name', sorted(FUNCTIONS))
def test_against_samples(name):
  fn, kind, smooth_at_zero = FUNCTIONS[name]
  assert cf.recognise(chain_from_fn(fn)).kind == kind
  _check_against_samples(fn, fn, name, (kind, kind), smooth_at_zero)


# Cross-moments within the relu family, sign × relu (closed), relu6 × gelu
# (quadrature, different kinks), erf × sin (quadrature, different closed
# families) and an affine side (1-D expectations).
PAIRS = [('relu', 'identity'), ('sign', 'identity'), ('abs', 'leaky_relu'), ('sign', 'relu'),
         ('relu6', 'gelu_tanh'), ('erf', 'sin'), ('identity', 'user')]


def _fn(name):
  return (lambda u: u) if name == 'identity' else FUNCTIONS[name][0]


def _kind(name):
  return 'affine' if name == 'identity' else FUNCTIONS[name][1]


@pytest.mark.parametrize('f_name,g_name', PAIRS)
def test_different_functions_against_samples(f_name, g_name):
  _check_against_samples(_fn(f_name), _fn(g_name), f'E[{f_name} {g_name}]',
                         (_kind(f_name), _kind(g_name)), False)


def test_cross_moment_closed_forms():
  relu, ident = chain_from_fn(jax.nn.relu), Chain()
  cov = np.array([0.3, -0.8, 1.0])
  t, dt = expect_pair(ident, (), relu, (), 0.0, 0.0, 1.0, np.array([1.0, 4.0, 1.0]), cov)
  np.testing.assert_allclose(t, cov / 2, rtol=1e-14)      # E[u relu(v)] = cov/2
  np.testing.assert_allclose(dt, 0.5, rtol=1e-14)         # E[relu'(v)] = 1/2
  sign = chain_from_fn(jnp.sign)
  t, _ = expect_pair(sign, (), ident, (), 0.0, 0.0, 4.0, 1.0, 1.2)
  np.testing.assert_allclose(t, 1.2 / 2 * math.sqrt(2 / math.pi), rtol=1e-14)


def test_arc_cosine_kernels_of_cho_and_saul():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((7, 5)) * rng.uniform(0.1, 3, (7, 1))
  x = np.concatenate([x, x[:1], -x[1:2]])       # ρ = 1 and ρ = -1 pairs
  nx = np.linalg.norm(x, axis=1)
  cos = np.clip(x @ x.T / np.outer(nx, nx), -1, 1)
  theta = np.arccos(cos)
  # Cho & Saul (2009): k_n(x, y) = |x|^n |y|^n J_n(θ)/π, J_1 = sin θ + (π - θ) cos θ,
  # J_0 = π - θ; relu's kernel is k_1/2 and its derivative's is k_0/2.
  k1 = np.outer(nx, nx) * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
  k0 = (np.pi - theta) / (2 * np.pi)
  relu = chain_from_fn(jax.nn.relu)
  t, dt = expect_pair(relu, (), relu, (), 0.0, 0.0, (nx**2)[:, None], (nx**2)[None], x @ x.T)
  np.testing.assert_allclose(t, k1, rtol=0, atol=1e-12 * k1.max())
  np.testing.assert_allclose(dt, k0, rtol=0, atol=1e-12)


CLOSED = ['relu', 'leaky_relu', 'abs', 'sign', 'erf', 'sin', 'cos_affine', 'exp']


@pytest.mark.parametrize('name', CLOSED)
def test_closed_forms_against_quadrature(name):
  chain = chain_from_fn(FUNCTIONS[name][0])
  var1 = np.array([1.0, 2.0, 0.7, 1.2, 0.3, 3.0, 5.0])
  var2 = np.array([0.5, 2.0, 1.5, 0.8, 1.0, 3.0, 2.0])
  rho = np.array([0.3, 1.0, -1.0, 0.0, 0.999, 0.9, -0.6])
  cov = rho * np.sqrt(var1 * var2)
  t, dt = expect_pair(chain, (), chain, (), 0.0, 0.0, var1, var2, cov)
  tq, dtq = quad.pair_quadrature(chain, (), chain, (), 0.0, 0.0, var1, var2, cov)
  # Piecewise Gauss–Legendre, 32 nodes per piece; 1e-9 leaves room for the
  # sqrt-sensitivity of J0 at ρ = 1 (an ulp of ρ moves J0 by ~1e-9).
  np.testing.assert_allclose(t, tq, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(dt, dtq, rtol=1e-8, atol=1e-8)


def test_closed_forms_with_means_against_quadrature():
  for fn in (lambda u: jnp.cos(2 * u + 1), lambda u: jnp.exp(0.5 * u) - 1):
    chain = chain_from_fn(fn)
    args = (M_MEAN1, M_MEAN2, M_VAR1, M_VAR2, M_COV)
    t, dt = expect_pair(chain, (), chain, (), *args)
    tq, dtq = quad.pair_quadrature(chain, (), chain, (), *args)
    np.testing.assert_allclose(t, tq, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dt, dtq, rtol=1e-10, atol=1e-12)


def _relu6_reference(mean1, mean2, var1, var2, cov):
  """E[relu6(u) relu6(v)] and E[relu6'(u) relu6'(v)]: adaptive quadrature in z1 of
  the closed-form conditional expectation of v | z1 (relu6 = relu(x) - relu(x - 6))."""
  s1, s2 = math.sqrt(var1), math.sqrt(var2)
  rho = cov / (s1 * s2)
  c, d = s2 * rho, s2 * math.sqrt(max(1 - rho * rho, 0))
  relu6 = lambda x: min(max(x, 0.0), 6.0)

  def cond(mu):
    if d == 0:
      return relu6(mu), float(0 < mu < 6)
    e = 0.0
    for k, sgn in ((0.0, 1), (6.0, -1)):
      t = (mu - k) / d
      e += sgn * ((mu - k) * scipy.stats.norm.cdf(t) + d * scipy.stats.norm.pdf(t))
    return e, scipy.stats.norm.cdf((6 - mu) / d) - scipy.stats.norm.cdf(-mu / d)

  pts = [(k - mean1) / s1 for k in (0, 6)] + [(k - mean2) / c for k in (0, 6) if c]
  pts = sorted(p for p in pts if -12 < p < 12)
  out = []
  for j in range(2):
    def integrand(z):
      u = mean1 + s1 * z
      fu = relu6(u) if j == 0 else float(0 < u < 6)
      return fu * cond(mean2 + c * z)[j] * scipy.stats.norm.pdf(z)
    out.append(scipy.integrate.quad(integrand, -12, 12, points=pts, epsabs=1e-14,
                                    epsrel=1e-13, limit=400)[0])
  return out


def test_relu6_against_reference_integration_and_samples():
  fn = jax.nn.relu6
  chain = chain_from_fn(fn)
  mean1 = np.array([0.0, 0.0, 2.0, 1.0])
  mean2 = np.array([0.0, 0.0, -1.0, 1.0])
  var1 = np.array([16.0, 25.0, 9.0, 30.0])
  var2 = np.array([16.0, 25.0, 36.0, 30.0])
  rho = np.array([0.5, 1.0, 0.95, 0.999])
  cov = rho * np.sqrt(var1 * var2)
  t, dt = expect_pair(chain, (), chain, (), mean1, mean2, var1, var2, cov)
  ref = np.array([_relu6_reference(*a) for a in zip(mean1, mean2, var1, var2, cov)])
  np.testing.assert_allclose(t, ref[:, 0], rtol=1e-10)
  np.testing.assert_allclose(dt, ref[:, 1], rtol=1e-10)
  mc_t, se_t, mc_dt, se_dt = _sample_moments(fn, fn, mean1, mean2, var1, var2, cov)
  _assert_within_se(t, mc_t, se_t, 'relu6')
  _assert_within_se(dt, mc_dt, se_dt, "relu6'")


def test_per_input_arguments_against_samples():
  a = np.array([1.5, -0.7, 0.0, 2.0, 1.0, -1.0])
  b = np.array([0.3, -1.0, 0.5, 0.0, 2.0, -0.2])
  cases = [
      (lambda u, a: jax.nn.relu(a * u), (a,), 'hom1'),
      (lambda u, a, b: jnp.tanh(a * u + b), (a, b), 'other'),
      (lambda u, a: jnp.clip(u, -jnp.abs(a), jnp.abs(a)), (a,), 'other'),
  ]
  for fn, args, kind in cases:
    chain = chain_from_fn(fn, n_args=len(args))
    assert cf.recognise(chain, args).kind == kind
    t, dt = expect_pair(chain, args, chain, args, 0.0, 0.0, ZM_VAR1, ZM_VAR2, ZM_COV)
    mc_t, se_t, mc_dt, se_dt = _sample_moments(fn, fn, 0., 0., ZM_VAR1, ZM_VAR2, ZM_COV, args, args)
    _assert_within_se(t, mc_t, se_t, 'second moment with arguments')
    mask = np.arange(len(a)) != ZM_POINT_MASS
    _assert_within_se(dt, mc_dt, se_dt, 'NTK factor with arguments', mask)
  # Arguments on one side only, against identity on the other.
  fn = cases[1][0]
  chain = chain_from_fn(fn, n_args=2)
  t, dt = expect_pair(chain, (a, b), Chain(), (), M_MEAN1[:1], M_MEAN2[:1], 1.3, 0.6, 0.5)
  mc_t, se_t, mc_dt, se_dt = _sample_moments(
      lambda u, a, b: fn(u, a, b), lambda v: v, M_MEAN1[:1], M_MEAN2[:1],
      np.full(6, 1.3), np.full(6, 0.6), np.full(6, 0.5), (a, b))
  _assert_within_se(t, mc_t, se_t, 'tanh(a u + b) · v')
  _assert_within_se(dt, mc_dt, se_dt, "tanh'(a u + b) a · 1")


@pytest.mark.parametrize('name', ['relu', 'sign', 'erf', 'tanh', 'relu6', 'elu'])
def test_expect_single_against_samples(name):
  fn = FUNCTIONS[name][0]
  chain = chain_from_fn(fn)
  mean = np.array([0.0, 0.7, -1.2, 0.4, 0.0])
  var = np.array([1.0, 2.0, 0.5, 0.0, 9.0])
  e = expect_single(chain, (), mean, var)
  e0 = expect_single(chain, (), 0.0, var)
  samples = np.asarray(fn(mean[:, None] + np.sqrt(var)[:, None] * _Z[0]))
  se = samples.std(1) / math.sqrt(N_SAMPLES)
  _assert_within_se(e, samples.mean(1), se, f'E {name}')
  zero = mean == 0
  np.testing.assert_allclose(np.asarray(e0)[zero], np.asarray(e)[zero], rtol=1e-12, atol=1e-14)


def test_float32_matches_float64():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((12, 6)) * rng.uniform(0.2, 3, (12, 1))
  k = (x @ x.T / 6).astype(np.float32)         # inputs representable in float32
  v = np.diagonal(k)
  for name in ['relu', 'abs', 'sign', 'erf', 'sin', 'exp', 'tanh']:
    chain = chain_from_fn(FUNCTIONS[name][0])
    r64 = expect_pair(chain, (), chain, (), 0.0, 0.0, v[:, None].astype(float),
                      v[None].astype(float), k.astype(float))
    r32 = expect_pair(chain, (), chain, (), 0.0, 0.0, jnp.asarray(v[:, None]),
                      jnp.asarray(v[None]), jnp.asarray(k))
    rtol = 1e-5 if name != 'tanh' else 1e-4   # quadrature: 16 nodes per piece
    for a, b in zip(r32, r64):
      assert a.dtype == jnp.float32
      np.testing.assert_allclose(a, b, rtol=0, atol=rtol * float(jnp.max(jnp.abs(b))) + 1e-30)


def test_float32_deep_relu_large_weights_does_not_overflow():
  relu = chain_from_fn(jax.nn.relu, dtype=jnp.float32)
  k = jnp.asarray([[1.0, 0.3], [0.3, 2.0]], jnp.float32)
  for _ in range(40):                               # W_std² = 16 per layer: 16^40 ≈ 1e48
    v = jnp.diagonal(k)
    t, dt = expect_pair(relu, (), relu, (), 0.0, 0.0, v[:, None], v[None], k)
    k = 16.0 * t
    if not jnp.all(jnp.isfinite(k)):
      break
  # The kernel itself overflows float32 eventually; the closed form must not
  # produce NaN or overflow before the kernel does: check a huge finite input.
  big = jnp.asarray([[1e37, 5e36], [5e36, 2e37]], jnp.float32)
  v = jnp.diagonal(big)
  t, dt = expect_pair(relu, (), relu, (), 0.0, 0.0, v[:, None], v[None], big)
  assert jnp.all(jnp.isfinite(t)) and jnp.all(jnp.isfinite(dt))
  np.testing.assert_allclose(np.diagonal(t), np.asarray(v) / 2, rtol=1e-6)


GRAD_FUNCTIONS = ['relu', 'abs', 'sign', 'erf', 'sin', 'relu6']


@pytest.mark.parametrize('name', GRAD_FUNCTIONS)
def test_gradients_finite_at_correlation_one_and_zero_variance(name):
  chain = chain_from_fn(FUNCTIONS[name][0])
  # (var1, var2, cov): u = v; u = -v; u ≡ 0; both ≡ 0.
  var1 = jnp.asarray([1.3, 0.8, 0.0, 0.0])
  var2 = jnp.asarray([1.3, 0.8, 1.0, 0.0])
  cov = jnp.asarray([1.3, -0.8, 0.0, 0.0])
  # Closed forms also against the identity (a 1-D expectation); quadrature once.
  for g in (chain, Chain()) if FUNCTIONS[name][1] != 'other' else (chain,):
    def total(v1, v2, c):
      t, dt = expect_pair(chain, (), g, (), 0.0, 0.0, v1, v2, c)
      return jnp.sum(t + dt)
    grads = jax.grad(total, argnums=(0, 1, 2))(var1, var2, cov)
    assert all(np.isfinite(gr).all() for gr in grads), (name, grads)


def test_gradient_values():
  relu = chain_from_fn(jax.nn.relu)
  # Price's theorem: ∂/∂cov E[relu(u) relu(v)] = E[relu'(u) relu'(v)], also at ρ = 1.
  t = lambda c, v=1.7: expect_pair(relu, (), relu, (), 0.0, 0.0, v, v, c)[0]
  for c in (0.4, 1.7):
    dt = expect_pair(relu, (), relu, (), 0.0, 0.0, 1.7, 1.7, c)[1]
    np.testing.assert_allclose(jax.grad(t)(jnp.asarray(c)), dt, rtol=1e-12)
  # Along var1 = var2 = cov (the diagonal) relu's kernel is var/2.
  np.testing.assert_allclose(jax.grad(lambda v: t(v, v))(jnp.asarray(1.7)), 0.5, rtol=1e-12)
  # Quadrature gradients at an interior point against finite differences.
  tanh = chain_from_fn(jnp.tanh)
  q = lambda x: expect_pair(tanh, (), tanh, (), 0.2, -0.1, x[0], x[1], x[2], ntk=False)[0]
  x0 = jnp.asarray([1.1, 0.7, 0.4])
  g = jax.grad(q)(x0)
  h = 1e-5
  fd = [(q(x0 + h * e) - q(x0 - h * e)) / (2 * h) for e in jnp.eye(3)]
  np.testing.assert_allclose(g, fd, rtol=1e-6)


@pytest.mark.parametrize('pair', [('relu', 'relu'), ('relu', 'sign'), ('tanh', 'relu6'),
                                  ('erf', 'identity')])
def test_symmetric_under_swapping_sides(pair):
  f, g = (chain_from_fn(_fn(n)) for n in pair)
  rng = np.random.default_rng(3)
  x1, x2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
  var1, var2 = (x1**2).sum(1)[:, None] / 3, (x2**2).sum(1)[None] / 3
  cov = x1 @ x2.T / 3
  t, dt = expect_pair(f, (), g, (), 0.0, 0.0, var1, var2, cov)
  ts, dts = expect_pair(g, (), f, (), 0.0, 0.0, var2.T, var1.T, cov.T)
  assert t.shape == (4, 5)
  np.testing.assert_allclose(t, ts.T, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(dt, dts.T, rtol=1e-9, atol=1e-12)


def test_loop_and_vectorised_quadrature_agree(monkeypatch):
  f, g = chain_from_fn(jnp.tanh), chain_from_fn(jax.nn.relu6)
  args = (M_MEAN1, M_MEAN2, M_VAR1 * 4, M_VAR2 * 4, M_COV * 4)
  vec = expect_pair(f, (), g, (), *args)
  monkeypatch.setattr(quad, 'VECTORISE_BUDGET', 1)
  jax.clear_caches()         # the quadrature is jitted: retrace with the new budget
  loop = expect_pair(f, (), g, (), *args)
  jax.clear_caches()
  for a, b in zip(vec, loop):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_chain_from_fn_and_recognition():
  relu = chain_from_fn(jax.nn.relu)
  assert [n.prim for n in relu.nodes] == [jax.lax.max_p]
  assert chain_from_fn(lambda u: u).is_identity
  leaky = chain_from_fn(jax.nn.leaky_relu)
  assert jax.lax.select_n_p in [n.prim for n in leaky.nodes]
  x = jnp.linspace(-3, 3, 13)
  for fn in (jax.nn.relu, jax.nn.leaky_relu, jax.nn.gelu, jax.nn.hard_tanh, jax.nn.softplus,
             jax.nn.selu, _user_chain):
    np.testing.assert_allclose(chain_from_fn(fn)(x), fn(x), rtol=1e-15)
  forms = {
      'relu': (0.0, 1.0), 'leaky_relu': (0.01, 1.0), 'abs': (-1.0, 1.0),
  }
  for name, coef in forms.items():
    form = cf.recognise(chain_from_fn(FUNCTIONS[name][0]))
    assert form.kind == 'hom1'
    np.testing.assert_allclose([float(c) for c in form.c], coef)
  ab = cf.recognise(chain_from_fn(lambda u: -0.4 * jnp.minimum(u, 0) + 2 * jnp.maximum(u, 0)))
  assert ab.kind == 'hom1'
  np.testing.assert_allclose([float(c) for c in ab.c], (-0.4, 2.0))
  assert cf.recognise(chain_from_fn(jax.nn.relu6)).kind == 'other'
  assert quad.chain_kinks(chain_from_fn(jax.nn.relu6)) == [(0.0, None), (6.0, None)]
  assert sorted(quad.chain_kinks(chain_from_fn(jax.nn.hard_sigmoid))) == [(-3.0, None), (3.0, None)]
  assert quad.chain_kinks(chain_from_fn(lambda u: jnp.tanh(2 * u - 1))) == [(0.5, 0.5)]
  assert quad.chain_kinks(chain_from_fn(lambda u: jnp.floor(u))) is None


def test_fast_arccos_accuracy():
  x = np.linspace(-1, 1, 200001).astype(np.float32)
  ref = np.arccos(x.astype(np.float64))
  err = np.abs(np.asarray(cf.fast_arccos(jnp.asarray(x)), np.float64) - ref)
  assert err.max() < 5e-7                          # measured 4.3e-7 (jnp.arccos: 2.7e-7)
  assert (err / np.spacing(ref.astype(np.float32))).max() < 4   # measured 2.8 ulp


def test_float32_arc_cosine_is_accurate_to_a_few_ulps():
  # The float32 path (one square root: A&S 4.4.46 and a fit of the J1 tail)
  # against the float64 path (jnp.arccos) at the same float32 correlations,
  # densest near ρ = ±1 where J1(∓ρ) and J0(∓ρ) vanish.
  rho = np.concatenate([np.linspace(-1, 1, 100001), 1 - np.logspace(-7, 0, 1000),
                        -1 + np.logspace(-7, 0, 1000)]).astype(np.float32)
  # Outside the band where ρ is snapped to ±1 (a choice tested on its own).
  rho = rho[np.abs(rho) < 1 - 16 * np.finfo(np.float32).eps]
  want = cf.arc_cosine(jnp.asarray(rho, jnp.float64))
  got = cf.arc_cosine(jnp.asarray(rho))
  for w, g in zip(want, got):
    assert g.dtype == jnp.float32
    w, g = np.asarray(w), np.asarray(g, np.float64)
    big = w > 1e-6
    rel = np.abs(g - w)[big] / w[big]
    assert rel.max() < 6e-7                # measured 2.4e-7 (the √(1-ρ²) form: 8e-2)
    assert np.abs(g - w).max() < 1e-7


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_arc_cosine_snaps_correlations_within_a_few_ulps_of_one(dtype):
  eps = np.finfo(dtype).eps
  for sign in (1, -1):
    near = jnp.asarray(sign * (1 - 4 * eps), dtype)
    beyond = jnp.asarray(sign * (1 + 4 * eps), dtype)
    at = jnp.asarray(sign * 1.0, dtype)
    for x in (near, beyond):
      for got, want in zip(cf.arc_cosine(x), cf.arc_cosine(at)):
        assert float(got) == float(want)
      # Derivatives as at ±1: finite, J0's is 0 there (as NT's).
      d = jax.jacfwd(lambda r: jnp.stack(cf.arc_cosine(r)))(x)
      np.testing.assert_array_equal(np.asarray(d), np.asarray(
          jax.jacfwd(lambda r: jnp.stack(cf.arc_cosine(r)))(at)))


# ----------------------------------------------------------------------------
# Chains with deterministic arguments (a normalisation's scale and shift).


def _scaled_relu_chain():
  """`max(u·γ + β, 0)` with γ, β chain arguments, as a LayerNorm or BatchNorm
  followed by a ReLU gives it."""
  from jax.extend.core import primitives as P
  from infwidth.domain.chain import ChainBuilder, U, arg, const
  b = ChainBuilder(2)
  inner = b.binary('add', b.binary('mul', U, arg(0)), arg(1))
  return b.build(b.add(P.max_p, {}, (inner, const(0.0))))


def test_derivative_chains_match_autodiff():
  from infwidth.domain.chain import derivative
  from infwidth.domain.moments import _input_derivative
  f = _scaled_relu_chain()
  rng = np.random.default_rng(0)
  u, g, b = rng.normal(size=(3, 64))
  for i in range(3):
    np.testing.assert_array_equal(derivative(f, i)(u, g, b), _input_derivative(f, i)(u, g, b))


def test_number_arguments_reach_the_closed_forms(monkeypatch):
  """γ = 1, β = 0 as Python numbers: the chain is a ReLU (closed form, no
  quadrature), also for the derivatives in γ and β."""
  from infwidth.domain.chain import derivative
  calls = []
  monkeypatch.setattr(quad, 'pair_quadrature', lambda *a, **k: calls.append(1))
  f = _scaled_relu_chain()
  m1, m2 = jnp.asarray([0.3]), jnp.asarray([-0.2])
  v1, v2, c = jnp.asarray([1.2]), jnp.asarray([0.8]), jnp.asarray([0.5])
  relu = chain_from_fn(jax.nn.relu)
  got, got_d = expect_pair(f, (1.0, 0.0), f, (1.0, 0.0), m1, m2, v1, v2, c)
  want, want_d = expect_pair(relu, (), relu, (), m1, m2, v1, v2, c)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got_d, want_d, rtol=1e-12)
  # ∂/∂γ at γ = 1, β = 0 is u·1(u > 0) = relu(u); ∂/∂β is the step.
  dg, _ = expect_pair(derivative(f, 1), (1.0, 0.0), derivative(f, 1), (1.0, 0.0),
                      m1, m2, v1, v2, c, ntk=False)
  db, _ = expect_pair(derivative(f, 2), (1.0, 0.0), derivative(f, 2), (1.0, 0.0),
                      m1, m2, v1, v2, c, ntk=False)
  np.testing.assert_allclose(dg, want, rtol=1e-12)
  np.testing.assert_allclose(db, want_d, rtol=1e-12)
  assert not calls
