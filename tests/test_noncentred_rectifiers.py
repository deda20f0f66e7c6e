"""Closed forms of the ReLU family for non-centred Gaussians (a significant
bias mean): through the bivariate normal CDF Φ₂ (docs/semantics.md).

Oracles: SciPy's bivariate normal CDF; a one-dimensional adaptive integral
of f(u)·E[g(v) | u] (the conditional expectation of a rectifier of a
Gaussian in closed form), split at the kink; sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import primitives as P
from scipy import integrate, stats

import infwidth as iw
from infwidth.domain import closed_forms as cf
from infwidth.domain.chain import ChainBuilder, U, const

_CAST = dict(new_dtype=np.dtype('float64'), sharding=None, weak_type=False)


def _form(kind):
  b = ChainBuilder()
  if kind == 'relu':
    out = b.add(P.max_p, {}, (U, const(0.0)))
  elif kind == 'leaky':
    out = b.add(P.max_p, {}, (U, b.binary('mul', U, const(0.2))))
  elif kind == 'abs':
    out = b.add(P.abs_p, {}, (U,))
  else:  # a step
    out = b.add(P.convert_element_type_p, _CAST, (b.add(P.gt_p, {}, (U, const(0.0))),))
  return cf.recognise(b.build(out))


_FNS = {'relu': lambda u: np.maximum(u, 0), 'leaky': lambda u: np.maximum(u, 0.2 * u),
        'abs': np.abs, 'step': lambda u: np.asarray(u > 0, float)}


def _conditional(kind, mean, sd):
  """E[g(v)] for v ~ N(mean, sd²)."""
  t = mean / sd
  pos = mean * stats.norm.cdf(t) + sd * stats.norm.pdf(t)    # E[v⁺]
  return {'relu': pos, 'leaky': 0.2 * mean + 0.8 * pos, 'abs': 2 * pos - mean,
          'step': stats.norm.cdf(t)}[kind]


def _oracle(f, g, m1, m2, s1, s2, rho):
  """E[f(u) g(v)] = ∫ f(u) E[g(v) | u] dN(u), split at u = 0."""
  cond_sd = s2 * np.sqrt(1 - rho ** 2)
  def integrand(u):
    cond_mean = m2 + rho * s2 * (u - m1) / s1
    inner = _conditional(g, cond_mean, cond_sd) if cond_sd > 0 else _FNS[g](cond_mean)
    return _FNS[f](u) * inner * stats.norm.pdf(u, m1, s1)
  lo, hi = m1 - 12 * s1, m1 + 12 * s1
  pieces = [(lo, min(0, hi)), (max(0, lo), hi)]
  return sum(integrate.quad(integrand, a, b, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
             for a, b in pieces if b > a)


@pytest.mark.parametrize('h,k', [(-3., -2.), (0., 0.), (0.5, 1.), (2., -1.), (5., 4.), (-8., 8.)])
@pytest.mark.parametrize('rho', [-1., -0.999999, -0.6, 0., 0.3, 0.95, 0.999999, 1.])
def test_bivariate_normal_cdf_against_scipy(h, k, rho):
  got = float(cf.bivariate_normal_cdf(jnp.float64(h), jnp.float64(k), jnp.float64(rho)))
  if abs(rho) == 1:
    ph, pk = stats.norm.cdf(h), stats.norm.cdf(k)
    want = min(ph, pk) if rho > 0 else max(0., ph + pk - 1)
  else:
    want = stats.multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([h, k])
  np.testing.assert_allclose(got, want, atol=1e-11)


PAIRS = [('relu', 'relu'), ('leaky', 'relu'), ('abs', 'leaky'), ('step', 'step'),
         ('step', 'relu'), ('relu', 'step')]


@pytest.mark.parametrize('f,g', PAIRS)
@pytest.mark.parametrize('m1,m2', [(0.3, -0.5), (2.0, 1.0), (-3.0, 0.5), (8.0, -8.0)])
@pytest.mark.parametrize('rho', [-0.9, 0.0, 0.5, 0.999])
def test_pair_moments_against_conditional_integrals(f, g, m1, m2, rho):
  s1, s2 = 1.2, 0.8
  t, dt = cf.pair_moments(_form(f), _form(g), jnp.float64(m1), jnp.float64(m2),
                          jnp.float64(s1 ** 2), jnp.float64(s2 ** 2), jnp.float64(rho * s1 * s2))
  np.testing.assert_allclose(float(t), _oracle(f, g, m1, m2, s1, s2, rho), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize('rho', [1.0, -1.0])
def test_pair_moments_at_correlation_one_against_sampling(rho):
  z = np.random.default_rng(0).standard_normal(2_000_000)
  m1, m2, s1, s2 = 0.4, -0.3, 1.1, 0.9
  u, v = m1 + s1 * z, m2 + rho * s2 * z
  for f, g in PAIRS:
    t, _ = cf.pair_moments(_form(f), _form(g), jnp.float64(m1), jnp.float64(m2),
                           jnp.float64(s1 ** 2), jnp.float64(s2 ** 2), jnp.float64(rho * s1 * s2))
    draws = _FNS[f](u) * _FNS[g](v)
    assert abs(float(t) - draws.mean()) < 5 * draws.std() / np.sqrt(z.size), (f, g)


def test_float32_and_finite_gradients():
  from infwidth.domain import gaussian
  b = ChainBuilder()
  relu = b.build(b.add(P.max_p, {}, (U, const(0.0))))
  args = [jnp.float32(a) for a in (0.7, -0.2, 1.3, 0.6, 0.5)]
  t32, _ = gaussian.expect_pair(relu, (), relu, (), *args)
  t64, _ = gaussian.expect_pair(relu, (), relu, (), *[jnp.float64(a) for a in args])
  assert t32.dtype == jnp.float32
  np.testing.assert_allclose(float(t32), float(t64), rtol=2e-6)
  for cov in (0.5, np.sqrt(1.3 * 0.6)):  # inside and at correlation 1
    grads = jax.grad(lambda m1, m2, v1, v2, c: cf.pair_moments(
        _form('relu'), _form('relu'), m1, m2, v1, v2, c)[0], argnums=(0, 1, 2, 3, 4))(
            0.7, -0.2, 1.3, 0.6, cov)
    assert all(np.isfinite(float(g)) for g in grads)


def quadrature_calls(monkeypatch):
  """A list that grows by one per traced two-dimensional quadrature (the
  compilation caches are cleared so that every expectation is traced anew)."""
  from infwidth.domain import quadrature as quad
  jax.clear_caches()
  calls, original = [], quad.pair_quadrature

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)
  monkeypatch.setattr(quad, 'pair_quadrature', counted)
  return calls


def test_kernel_with_significant_bias_means_takes_the_closed_form(monkeypatch):
  """Biases with mean 1 make every ReLU non-centred: no quadrature is traced,
  and the kernel equals the quadrature kernel of the same network."""
  def mlp(p, x):
    h = jax.nn.relu(x @ p['w0'] / np.sqrt(3) + p['b0'])
    return jax.nn.relu(h @ p['w1'] / 16 + p['b1']) @ p['w2'] / 16
  params = {'w0': jnp.ones((3, 256)), 'b0': jnp.ones(256), 'w1': jnp.ones((256, 256)),
            'b1': jnp.ones(256), 'w2': jnp.ones((256, 2))}
  stats_ = {k: iw.ParamStats(0.0, 1.0) for k in params}
  stats_['b0'] = stats_['b1'] = iw.ParamStats(1.0, 0.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
  calls = quadrature_calls(monkeypatch)
  k = iw.kernelize(mlp, params, param_stats=stats_)(x, None, ('nngp', 'ntk'))
  assert not calls
  # The same kernel with the non-centred closed forms switched off: quadrature.
  closed = cf.pair_moments
  monkeypatch.setattr(cf, 'pair_moments', lambda f, g, m1, m2, *a, **kw: (
      closed(f, g, m1, m2, *a, **kw) if cf.is_static_zero(m1) and cf.is_static_zero(m2)
      else None))
  jax.clear_caches()
  kq = iw.kernelize(mlp, params, param_stats=stats_)(x, None, ('nngp', 'ntk'))
  assert calls
  np.testing.assert_allclose(k.nngp, kq.nngp, rtol=1e-7)
  np.testing.assert_allclose(k.ntk, kq.ntk, rtol=1e-7)
