"""Whole dense networks: kernelize against Monte Carlo averages of finite networks.

The oracle is the average over parameter draws of `f(x1) f(x2)ᵀ / C` (NNGP) and
of `infwidth.empirical.empirical_ntk_fn` (NTK). It carries sampling error and
a finite-width bias: |MC - limit| ≲ k·SE + c·L/n·scale (DESIGN §6), where SE
is the entrywise standard error from the per-draw spread, L the number of
hidden layers, n the width and `scale` the kernel's largest entry. The mean
of a finite network's NNGP/NTK differs from the limit by O(L/n) relative
(Hanin & Nica 2020; Yaida 2020); c = 2 covers the constants of the networks
here, measured at widths 256–2048. Each test also checks that its tolerance
is tight enough to tell the right kernel from a 15% wrong one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import infwidth as iw
import mc_check
from infwidth.empirical import NtkImplementation, empirical_ntk_fn

D, C, N_IN = 8, 256, 4
C_NTK = 2          # logits whose empirical NTK is averaged (it concentrates; the NNGP does not)
SW, SB = 1.4, 0.3
K_SE = 4.0        # 16 correlated entries at 4 SE: a false alarm is < 1e-3 per test
C_WIDTH = 2.0


def dense(w, b, h):
  """NTK-parameterised dense layer: σ_w/√fan_in · h W + σ_b · b."""
  return SW / np.sqrt(w.shape[0]) * (h @ w) + SB * b


def _is_shape(s):
  return isinstance(s, tuple) and all(isinstance(i, int) for i in s)


def sample_gaussian(key, shapes, stats):
  """A draw of every leaf: Gaussian with the leaf's (mean, var)."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  st = treedef.flatten_up_to(stats)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([s.mean + np.sqrt(s.var) * jax.random.normal(k, sh)
                            for k, sh, s in zip(keys, leaves, st)])


def monte_carlo(apply_fn, shapes, stats, x, n_samples=64, seed=0):
  """Per-draw NNGP and NTK, (S, N, N) each, of networks with Gaussian leaves.

  Draws come from numpy (fixed seed); one jitted function per network gives
  `f(x) f(x)ᵀ / C` and the structured-derivative empirical NTK of the first
  `C_NTK` logits.
  """
  ntk_fn = empirical_ntk_fn(lambda p, x: apply_fn(p, x)[:, :C_NTK],
                            implementation=NtkImplementation.STRUCTURED_DERIVATIVES)

  @jax.jit
  def one(p):
    f = apply_fn(p, x)
    return f @ f.T / f.shape[-1], ntk_fn(x, None, p)

  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  st = treedef.flatten_up_to(stats)
  rng = np.random.default_rng(seed)
  nngp, ntk = [], []
  for _ in range(n_samples):
    p = [s.mean + np.sqrt(s.var) * rng.standard_normal(sh) for sh, s in zip(leaves, st)]
    k = one(treedef.unflatten(p))
    nngp.append(k[0])
    ntk.append(k[1])
  return np.stack(nngp), np.stack(ntk)


def check_against_mc(analytic, draws, n_hidden, width):
  mc_check.check_against_mc(analytic, draws, n_hidden, width, K_SE, C_WIDTH)


# ----------------------------------------------------------------------------
# Networks (functions of a parameter dict and an (N, D) batch).


def mlp_shapes(width, depth=2, d=D, c=C):
  dims = [d] + [width] * depth + [c]
  return {f'l{i}': ((a, b), (b,)) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}


def unit_stats(shapes):
  return jax.tree.map(lambda s: iw.ParamStats(0.0, 1.0), shapes, is_leaf=_is_shape)


def make_mlp(phi):
  def mlp(p, x):
    n = len(p)
    h = x
    for i in range(n):
      w, b = p[f'l{i}']
      h = dense(w, b, h)
      if i < n - 1:
        h = phi(h)
    return h
  return mlp


ACTS = {
    'relu': jax.nn.relu,
    'erf': erf,
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_erf': functools.partial(jax.nn.gelu, approximate=False),
    'tanh': jnp.tanh,
}

X = 0.9 * jax.random.normal(jax.random.PRNGKey(3), (N_IN, D))


def _kernelize(apply_fn, shapes, stats, x):
  params = sample_gaussian(jax.random.PRNGKey(99), shapes, stats)
  return iw.kernelize(apply_fn, params, param_stats=stats)(x, None, ('nngp', 'ntk'))


@pytest.mark.parametrize('act', sorted(ACTS))
def test_mlp_matches_monte_carlo(act):
  # tanh has no closed form here: it exercises the quadrature path.
  width = 512
  shapes = mlp_shapes(width)
  stats = unit_stats(shapes)
  f = make_mlp(ACTS[act])
  k = _kernelize(f, shapes, stats, X)
  nngp, ntk = monte_carlo(f, shapes, stats, X)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)


def test_standard_parameterisation_ntk_matches_monte_carlo():
  # W ~ N(0, σ²/fan_in), b ~ N(0, σ_b²), no multipliers: the NTK's weight terms
  # carry the width (hundreds here), the NNGP is the NTK-parameterisation one.
  width = 512
  shapes = mlp_shapes(width, depth=1)
  stats = {'l0': (iw.ParamStats(0.0, SW ** 2 / D), iw.ParamStats(0.0, SB ** 2)),
           'l1': (iw.ParamStats(0.0, SW ** 2 / width), iw.ParamStats(0.0, SB ** 2))}

  def f(p, x):
    h = jax.nn.relu(x @ p['l0'][0] + p['l0'][1])
    return h @ p['l1'][0] + p['l1'][1]

  k = _kernelize(f, shapes, stats, X)
  nngp, ntk = monte_carlo(f, shapes, stats, X)
  assert np.asarray(k.ntk).max() > 50 * np.asarray(k.nngp).max()
  check_against_mc(k.nngp, nngp, 1, width)
  check_against_mc(k.ntk, ntk, 1, width)


# LayerNorm written by hand: statistics over the feature axis, a scale of ones
# and a bias of zeros as parameters (variance 0: constants with an NTK term).
EPS = 1e-5


def layer_norm(h, g, beta):
  mu = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean((h - mu) ** 2, axis=-1, keepdims=True)
  return (h - mu) / jnp.sqrt(var + EPS) * g + beta


def ln_mlp(p, x):
  h = dense(*p['l0'], x)
  h = jax.nn.relu(layer_norm(h, p['g'], p['beta']))
  h = dense(*p['l1'], h)
  return dense(*p['l2'], jax.nn.relu(h))


def test_layernorm_mlp():
  width = 512
  shapes = dict(mlp_shapes(width), g=(width,), beta=(width,))
  stats = dict(unit_stats(mlp_shapes(width)), g=iw.ParamStats(1.0, 0.0),
               beta=iw.ParamStats(0.0, 0.0))
  k = _kernelize(ln_mlp, shapes, stats, X)
  # Closed form of the NNGP: in the limit LayerNorm divides each input by
  # √(K0(x,x) + ε) (the feature mean → 0), then ReLU and two dense layers.
  x = np.asarray(X)
  k0 = SW ** 2 * x @ x.T / D + SB ** 2
  kn = k0 / np.sqrt(np.outer(np.diag(k0) + EPS, np.diag(k0) + EPS))
  k1 = SW ** 2 * _relu_t(kn) + SB ** 2
  k2 = SW ** 2 * _relu_t(k1) + SB ** 2
  np.testing.assert_allclose(k.nngp, k2, rtol=1e-9)
  nngp, ntk = monte_carlo(ln_mlp, shapes, stats, X)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)


def _angle(k):
  norm = np.sqrt(np.outer(np.diag(k), np.diag(k)))
  cos = np.clip(k / norm, -1, 1)
  np.fill_diagonal(cos, 1.0)    # exact: arccos(1 - ulp) would be 1.5e-8, not 0
  return norm, np.arccos(cos)


def _relu_t(k):
  norm, th = _angle(k)
  return norm * (np.sin(th) + (np.pi - th) * np.cos(th)) / (2 * np.pi)


def _relu_tdot(k):
  _, th = _angle(k)
  return (np.pi - th) / (2 * np.pi)


def residual(p, x):
  h = dense(*p['l0'], x)
  r = h + SW / np.sqrt(h.shape[-1]) * (jax.nn.relu(h) @ p['w'])
  return dense(*p['l1'], r)


def test_residual_block():
  # h + W·relu(h): W is fresh and centred, so the two branches are uncorrelated:
  # K_r = K_h + σ²T(K_h), Θ_r = Θ_h + σ²T(K_h) + σ²Ṫ(K_h)Θ_h.
  width = 512
  shapes = dict(mlp_shapes(width, depth=1), w=(width, width))
  stats = dict(unit_stats(mlp_shapes(width, depth=1)), w=iw.ParamStats(0.0, 1.0))
  k = _kernelize(residual, shapes, stats, X)
  x = np.asarray(X)
  kh = SW ** 2 * x @ x.T / D + SB ** 2
  kr = kh + SW ** 2 * _relu_t(kh)
  tr = kh + SW ** 2 * _relu_t(kh) + SW ** 2 * _relu_tdot(kh) * kh
  np.testing.assert_allclose(k.nngp, SW ** 2 * kr + SB ** 2, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, SW ** 2 * kr + SB ** 2 + SW ** 2 * tr, rtol=1e-10)
  nngp, ntk = monte_carlo(residual, shapes, stats, X)
  check_against_mc(k.nngp, nngp, 1, width)
  check_against_mc(k.ntk, ntk, 1, width)


# ----------------------------------------------------------------------------
# Heavy sweeps (pytest -m slow).

ALL_ACTS = {
    'relu': jax.nn.relu, 'leaky_relu': jax.nn.leaky_relu, 'abs': jnp.abs, 'erf': erf,
    'gelu_tanh': ACTS['gelu_tanh'], 'gelu_erf': ACTS['gelu_erf'], 'tanh': jnp.tanh,
    'sigmoid': jax.nn.sigmoid, 'silu': jax.nn.silu, 'softplus': jax.nn.softplus,
    'elu': jax.nn.elu, 'selu': jax.nn.selu, 'sin': jnp.sin, 'relu6': jax.nn.relu6,
}


@pytest.mark.slow
@pytest.mark.parametrize('act', sorted(ALL_ACTS))
def test_activation_sweep(act):
  width = 1024
  shapes = mlp_shapes(width)
  stats = unit_stats(shapes)
  f = make_mlp(ALL_ACTS[act])
  k = _kernelize(f, shapes, stats, X)
  nngp, ntk = monte_carlo(f, shapes, stats, X, n_samples=128, seed=1)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)


@pytest.mark.slow
@pytest.mark.parametrize('act', ['relu', 'erf'])
def test_error_shrinks_with_width(act):
  # Error ≈ c₁/√(nS) + c₂/n: from n = 32 to n = 1024 it must fall by well over 2×.
  errs = []
  for width in (32, 1024):
    shapes = mlp_shapes(width, depth=3)
    stats = unit_stats(shapes)
    f = make_mlp(ACTS[act])
    k = _kernelize(f, shapes, stats, X)
    nngp, ntk = monte_carlo(f, shapes, stats, X, n_samples=64, seed=2)
    errs.append(max(np.abs(np.asarray(nngp).mean(0) - k.nngp).max() / np.abs(k.nngp).max(),
                    np.abs(np.asarray(ntk).mean(0) - k.ntk).max() / np.abs(k.ntk).max()))
  assert errs[1] < errs[0] / 2, errs
