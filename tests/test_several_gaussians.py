"""Functions of several Gaussian values: gated units (GLU, SwiGLU), `h1 * h2`,
products of correlated values.

A product of values computed with different weights is one term with
cofactors; its moments factorise over the independent parts. A polynomial
of correlated values is one chain of several Gaussians, integrated exactly
(docs/semantics.md, "Functions of several Gaussian values"). Checked against
closed forms (Isserlis), Monte Carlo of finite networks, and the same
network written in Flax and Equinox.
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from test_kernelize_monte_carlo import (D, SB, SW, X, C, check_against_mc, dense, monte_carlo,
                                        sample_gaussian, unit_stats)

W = 512


def _shapes(width=W, *names):
  shapes = {n: ((D, width), (width,)) for n in names}
  shapes['o'] = ((width, C), (C,))
  return shapes


def _kernel(f, shapes, x=X, x2=None, **options):
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(99), shapes, stats)
  return iw.kernelize(f, params, param_stats=stats, **options)(x, x2, ('nngp', 'ntk'))


def glu(p, x):
  """Dauphin et al.'s gated linear unit: (W_a x) ⊙ σ(W_g x)."""
  return dense(*p['o'], dense(*p['a'], x) * jax.nn.sigmoid(dense(*p['g'], x)))


def swiglu(p, x):
  return dense(*p['o'], jax.nn.silu(dense(*p['a'], x)) * dense(*p['g'], x))


def gated_residual(p, x):
  """A product plus a value correlated with one of its factors."""
  a = dense(*p['a'], x)
  return dense(*p['o'], jax.nn.relu(a) * jnp.tanh(dense(*p['g'], x)) + a)


def triple(p, x):
  """Three independent factors, one of them a bias-only mean."""
  return dense(*p['o'], jnp.cos(dense(*p['a'], x)) * dense(*p['g'], x)
               * jax.nn.sigmoid(dense(*p['c'], x)))


@pytest.mark.parametrize('net,names', [(glu, 'ag'), (swiglu, 'ag'), (gated_residual, 'ag'),
                                       (triple, 'agc')])
def test_gated_units_match_monte_carlo(net, names):
  shapes = _shapes(W, *names)
  k = _kernel(net, shapes)
  nngp, ntk = monte_carlo(net, shapes, unit_stats(shapes), X)
  check_against_mc(k.nngp, nngp, 1, W)
  check_against_mc(k.ntk, ntk, 1, W)
  for m in (k.nngp, k.ntk):
    np.testing.assert_allclose(m, m.T, rtol=1e-12)
    assert np.linalg.eigvalsh(m).min() > -1e-10


def _linear_kernel(x1, x2):
  return SW ** 2 * x1 @ x2.T / D + SB ** 2


def test_product_of_two_linear_layers_closed_form():
  """z = W_o (u ⊙ v) with u, v independent linear layers:
  NNGP = σ_w² K K + σ_b², and the NTK adds each factor's Θ = K times the other's K."""
  def net(p, x):
    return dense(*p['o'], dense(*p['a'], x) * dense(*p['g'], x))
  x2 = X[:3] * 1.3
  k = _kernel(net, _shapes(W, 'a', 'g'), X, x2)
  kin = _linear_kernel(X, x2)
  nngp = SW ** 2 * kin * kin + SB ** 2
  # Θ_h = Θ(u)K(v) + K(u)Θ(v) with Θ(u) = K(u) (one NTK-parameterised layer).
  ntk = nngp + SW ** 2 * (2 * kin * kin)
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10)


def test_two_gated_layers_and_jit():
  """Gated units stacked: the second gate's inputs are products themselves."""
  width = W
  shapes = {'a': ((D, width), (width,)), 'g': ((D, width), (width,)),
            'a2': ((width, width), (width,)), 'g2': ((width, width), (width,)),
            'o': ((width, C), (C,))}

  def net(p, x):
    h = dense(*p['a'], x) * jax.nn.sigmoid(dense(*p['g'], x))
    h = jax.nn.gelu(dense(*p['a2'], h)) * dense(*p['g2'], h)
    return dense(*p['o'], h)

  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(9), shapes, stats)
  kfn = iw.kernelize(net, params, param_stats=stats)
  k = kfn(X, None, ('nngp', 'ntk'))
  kj = jax.jit(kfn, static_argnums=2)(X, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(kj.nngp, k.nngp, rtol=1e-10)
  nngp, ntk = monte_carlo(net, shapes, stats, X)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)


def test_float32():
  shapes = _shapes(W, 'a', 'g')
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(99), shapes, stats)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  k32 = iw.kernelize(glu, p32, param_stats=stats)(X.astype(jnp.float32), None, 'nngp')
  k64 = iw.kernelize(glu, params, param_stats=stats)(X, None, 'nngp')
  assert k32.dtype == jnp.float32
  np.testing.assert_allclose(k32, k64, rtol=1e-4)


class FlaxGLU(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.width)(x) * jax.nn.sigmoid(nn.Dense(self.width)(x))
    return nn.Dense(C)(h)


class EqxSwiGLU(eqx.Module):
  a: eqx.nn.Linear
  g: eqx.nn.Linear
  o: eqx.nn.Linear

  def __init__(self, key, width):
    ka, kg, ko = jax.random.split(key, 3)
    self.a = eqx.nn.Linear(D, width, key=ka)
    self.g = eqx.nn.Linear(D, width, key=kg)
    self.o = eqx.nn.Linear(width, C, key=ko)

  def __call__(self, x):
    return self.o(jax.nn.silu(self.a(x)) * self.g(x))


def _plain_gated(gate_a, gate_g):
  def f(p, x):
    (wa, ba), (wg, bg), (wo, bo) = p
    return (gate_a(x @ wa + ba) * gate_g(x @ wg + bg)) @ wo + bo
  return f


def _standard_arrays(width, key=jax.random.PRNGKey(5)):
  out = []
  for a, b in ((D, width), (D, width), (width, C)):
    k1, k2, key = jax.random.split(key, 3)
    out.append((SW / np.sqrt(a) * jax.random.normal(k1, (a, b)),
                SB * jax.random.normal(k2, (b,))))
  return out


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
def test_flax_and_equinox_gated_units_equal_plain_jax():
  width = 128
  arrays = _standard_arrays(width)
  x2 = X[:2] + 0.5

  plain = iw.kernelize(_plain_gated(lambda a: a, jax.nn.sigmoid), arrays)(X, x2, ('nngp', 'ntk'))
  model = FlaxGLU(width)
  variables = model.init(jax.random.PRNGKey(0), X)
  names = sorted(variables['params'])
  params = {'params': {n: {'kernel': w, 'bias': b} for n, (w, b) in zip(names, arrays)}}
  flax_k = iw.kernelize(model.apply, params)(X, x2, ('nngp', 'ntk'))
  np.testing.assert_allclose(flax_k.nngp, plain.nngp, rtol=1e-10)
  np.testing.assert_allclose(flax_k.ntk, plain.ntk, rtol=1e-10)

  plain = iw.kernelize(_plain_gated(jax.nn.silu, lambda a: a), arrays)(X, x2, ('nngp', 'ntk'))
  m = EqxSwiGLU(jax.random.PRNGKey(0), width)
  for name, (w, b) in zip(('a', 'g', 'o'), arrays):
    layer = getattr(m, name)
    m = eqx.tree_at(lambda t: (getattr(t, name).weight, getattr(t, name).bias), m, (w.T, b))
    del layer
  params, static = eqx.partition(m, eqx.is_array)
  apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  eqx_k = iw.kernelize(apply, params)(X, x2, ('nngp', 'ntk'))
  np.testing.assert_allclose(eqx_k.nngp, plain.nngp, rtol=1e-10)
  np.testing.assert_allclose(eqx_k.ntk, plain.ntk, rtol=1e-10)


def _shared_bias_net(p, x):
  """p·q with p = u₁ + b, q = u₂ + b: correlated factors through the bias b."""
  b = p['a'][1]
  return dense(*p['o'], (SW * x @ p['a'][0] / np.sqrt(D) + b) * (SW * x @ p['g'][0] / np.sqrt(D) + b))


def test_product_of_correlated_values_closed_form():
  """Isserlis: with L = σ_w² x·x′/D, Cov(p, p′) = Cov(q, q′) = L + 1 and every
  other pair covaries through b alone (1), so E[pq p′q′] = 2 + (L + 1)², and
  Θ_h = E[qq′]Θ(p,p′) + E[qp′]Θ(p,q′) + E[pq′]Θ(q,p′) + E[pp′]Θ(q,q′)
      = 2(L + 1)² + 2."""
  x2 = X[:3] * 1.3
  k = _kernel(_shared_bias_net, _shapes(W, 'a', 'g'), X, x2)
  lin = SW ** 2 * X @ x2.T / D
  h = 2 + (lin + 1) ** 2
  np.testing.assert_allclose(k.nngp, SW ** 2 * h + SB ** 2, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, SW ** 2 * h + SB ** 2 + SW ** 2 * (2 * (lin + 1) ** 2 + 2),
                             rtol=1e-10)


def test_product_of_correlated_values_matches_monte_carlo():
  shapes = _shapes(W, 'a', 'g')
  k = _kernel(_shared_bias_net, shapes)
  nngp, ntk = monte_carlo(_shared_bias_net, shapes, unit_stats(shapes), X)
  check_against_mc(k.nngp, nngp, 1, W)
  check_against_mc(k.ntk, ntk, 1, W)


def test_max_of_independent_values_closed_form():
  """max(u₁, u₂) of independent layers with kernel K: max = (u₁+u₂)/2 + |u₁−u₂|/2
  with the two parts independent, so E[max max′] = K/2 + (√(K₁₁K₂₂ − K²) + K·arcsin ρ)/π,
  and Θ = (1/2 + arcsin(ρ)/π)·K (each layer's Θ = K where it is the maximum).
  Computed by the quasi-Monte Carlo rule: within 1% (its error at the default
  point count is about 1e-3)."""
  net = lambda p, x: dense(*p['o'], jnp.maximum(dense(*p['a'], x), dense(*p['g'], x)))
  k = _kernel(net, _shapes(W, 'a', 'g'))
  lin = _linear_kernel(X, X)
  d = np.sqrt(np.diag(lin))
  rho = np.clip(lin / np.outer(d, d), -1, 1)
  e = lin / 2 + (np.sqrt(np.maximum(np.outer(d, d) ** 2 - lin ** 2, 0)) + lin * np.arcsin(rho)) / np.pi
  nngp = SW ** 2 * e + SB ** 2
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-2)
  np.testing.assert_allclose(k.ntk, nngp + SW ** 2 * (0.5 + np.arcsin(rho) / np.pi) * lin,
                             rtol=1e-2)
  np.testing.assert_allclose(k.nngp, k.nngp.T, rtol=1e-12)
  # More points, closer: the option reaches the rule.
  fine = _kernel(net, _shapes(W, 'a', 'g'), integration_points=2 ** 16)
  assert np.abs(fine.nngp - nngp).max() < np.abs(k.nngp - nngp).max()
  np.testing.assert_allclose(fine.nngp, nngp, rtol=2e-3)


@pytest.mark.parametrize('act', [lambda a, g: jnp.maximum(a, g),
                                 lambda a, g: jnp.tanh(a * g),
                                 lambda a, g: jnp.tanh(a * jax.nn.sigmoid(g))])
def test_non_polynomial_functions_of_several_values_match_monte_carlo(act):
  shapes = _shapes(W, 'a', 'g')
  net = lambda p, x: dense(*p['o'], act(dense(*p['a'], x), dense(*p['g'], x)))
  k = _kernel(net, shapes)
  nngp, ntk = monte_carlo(net, shapes, unit_stats(shapes), X)
  check_against_mc(k.nngp, nngp, 1, W)
  check_against_mc(k.ntk, ntk, 1, W)


def test_sampled_rule_error_estimate_covers_its_error():
  """The quasi-Monte Carlo rule's groups give a standard error; against the
  closed form of E[max(u₁,u₂) max(v₁,v₂)] the error stays within 4 of them
  and shrinks with the point count."""
  from infwidth.domain import gaussian_engine as ge
  rho = jnp.array([-0.99, -0.5, 0., 0.3, 0.9, 0.999], jnp.float64)
  o, z = 1.0, 0.0
  cov = [[o, z, rho, z], [z, o, z, rho], [rho, z, o, z], [z, rho, z, o]]
  want = rho / 2 + (jnp.sqrt(1 - rho ** 2) + rho * jnp.arcsin(rho)) / jnp.pi
  errs = []
  for n in (2048, 32768):
    sec, _ = ge.expect_multi_sampled(jnp.maximum, (), 2, jnp.maximum, (), [0.] * 4, cov,
                                     n_points=n, groups=True)
    se = np.std(np.asarray(sec), 0, ddof=1) / np.sqrt(sec.shape[0])
    err = np.abs(np.asarray(sec.mean(0) - want))
    assert np.all(err <= 4 * se + 1e-4), (err, se)
    errs.append(err.max())
  assert errs[1] < errs[0] / 3


def test_gated_convolution_matches_monte_carlo():
  """A gated 1-D convolution (Dauphin et al.'s GLU layer) with a gate bias,
  a second convolution of the product, global average pooling."""
  from jax import lax
  width, length, d, n = 256, 6, 3, 3
  x = jax.random.normal(jax.random.PRNGKey(0), (n, length, d))

  def conv(w, h):
    return lax.conv_general_dilated(h, w, (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')
                                    ) / np.sqrt(w.shape[0] * w.shape[1])

  def net(p, x):
    h = conv(p['a'], x) * jax.nn.sigmoid(conv(p['g'], x) + 0.3 * p['b'])
    return jnp.mean(conv(p['a2'], h), axis=1) @ p['o'] / np.sqrt(width)

  shapes = {'a': (3, d, width), 'g': (3, d, width), 'b': (width,), 'a2': (3, width, width),
            'o': (width, width)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  rng = np.random.default_rng(0)
  sample = lambda: {k: jnp.asarray(rng.standard_normal(s)) for k, s in shapes.items()}
  k = iw.kernelize(net, sample(), param_stats=stats)(x, None, 'nngp')
  f = jax.jit(lambda p: (lambda out: out @ out.T / width)(net(p, x)))
  draws = np.stack([f(sample()) for _ in range(64)])
  check_against_mc(k, draws, 2, width)


def test_random_scale_inside_a_nonlinearity_beside_a_shortcut_matches_monte_carlo():
  """`relu(γ·y + h)`, a post-activation residual block with a BatchNorm-style
  scale γ (a random per-channel parameter): γ is one more Gaussian of the
  chain, integrated with `y` and the shortcut `h` by the quasi-Monte Carlo rule."""
  width, d = 512, 4
  x = jax.random.normal(jax.random.PRNGKey(0), (4, d))

  def net(p, x):
    h = jax.nn.relu(x @ p['w0'] / np.sqrt(d))
    y = h @ p['w1'] / np.sqrt(width)
    return jax.nn.relu(p['g'] * y + h) @ p['o'] / np.sqrt(width)

  shapes = {'w0': (d, width), 'w1': (width, width), 'g': (width,), 'o': (width, 256)}
  stats = {'w0': iw.ParamStats(0., 1.), 'w1': iw.ParamStats(0., 1.), 'g': iw.ParamStats(1., 0.25),
           'o': iw.ParamStats(0., 1.)}
  params = jax.tree.map(jnp.ones, shapes, is_leaf=lambda s: isinstance(s, tuple))
  k = iw.kernelize(net, params, param_stats=stats)(x, None, ('nngp', 'ntk'))
  nngp, ntk = monte_carlo(net, shapes, stats, x)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)
