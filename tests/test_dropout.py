"""Dropout in training mode: masks drawn from a key passed to the function.

The limit (docs/semantics.md, "Dropout"): a mask is independent of the
parameters and i.i.d. across inputs, positions and channels, so a masked
value `m·h/keep` keeps the moments of different entries and scales those of
the same entry (the same input of one batch, at the same position) by
`1/keep`; a nonlinearity of a masked value is a mixture over the mask's
values. Checked against closed forms, Monte Carlo of the finite networks
(fresh parameters and masks per draw), Flax's `nn.Dropout`, and Neural
Tangents 0.6.5's `stax.Dropout` (fixtures).
"""

import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
import mc_check
from infwidth import stax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'fixtures'))
from stax_architectures import DROPOUT, INPUTS  # noqa: E402

D, N, C = 6, 4, 256
C_NTK = 2          # logits whose NTK is averaged (it concentrates; the NNGP does not)
SW, SB = 1.4, 0.3
K_SE = 4.0         # 16 correlated entries at 4 SE: a false alarm is < 1e-3 per test
C_WIDTH = 2.0      # finite-width bias c·L/n, as in test_kernelize_monte_carlo
X = 0.9 * jax.random.normal(jax.random.PRNGKey(3), (N, D))
KEY = jax.random.PRNGKey(7)


def dense(w, b, h):
  return SW / np.sqrt(w.shape[0]) * (h @ w) + SB * b


def where_dropout(h, rng, keep):
  """`jax.example_libraries.stax.Dropout`: `where(bernoulli(keep), h / keep, 0)`."""
  return jnp.where(jax.random.bernoulli(rng, keep, h.shape), h / keep, 0)


def mul_dropout(h, rng, keep):
  """The same, written as a product with the mask."""
  return h * jax.random.bernoulli(rng, keep, h.shape).astype(h.dtype) / keep


def mlp(p, x, rng=None, phi=jax.nn.relu, keep=(0.5, 0.8), before_phi=False):
  """Dense → φ → dropout → dense → φ → dropout → readout (`before_phi`: the
  masks before the nonlinearities instead)."""
  keys = jax.random.split(rng, 2) if rng is not None else (None, None)
  h = x
  for i, (drop, k, q) in enumerate(zip((where_dropout, mul_dropout), keys, keep)):
    h = dense(*p[f'l{i}'], h)
    if before_phi and k is not None:
      h = drop(h, k, q)
    h = phi(h)
    if not before_phi and k is not None:
      h = drop(h, k, q)
  return dense(*p['out'], h)


def shapes(width, depth=2):
  dims = [D] + [width] * depth
  out = {f'l{i}': ((a, b), (b,)) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}
  out['out'] = ((width, C), (C,))
  return out


def _is_shape(s):
  return isinstance(s, tuple) and all(isinstance(i, int) for i in s)


def unit_stats(sh):
  return jax.tree.map(lambda s: iw.ParamStats(0.0, 1.0), sh, is_leaf=_is_shape)


def draw(rng, sh):
  return jax.tree.map(lambda s: rng.standard_normal(s), sh, is_leaf=_is_shape)


def kernels(f, sh, x=X, x2=None, dtype=np.float64, **kwargs):
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), draw(np.random.default_rng(99), sh))
  kfn = iw.kernelize(f, params, param_stats=unit_stats(sh))
  return kfn(jnp.asarray(x, dtype), x2, ('nngp', 'ntk'), **kwargs)


def monte_carlo(f, sh, x=X, n_samples=64, seed=0):
  """Per-draw NNGP `f fᵀ/C` and NTK (first `C_NTK` logits) of finite networks,
  with fresh Gaussian parameters and a fresh key (fresh masks) per draw."""

  @jax.jit
  def one(p, key):
    out = f(p, x, rng=key)
    jac = jax.jacrev(lambda q: f(q, x, rng=key)[:, :C_NTK])(p)
    ntk = sum(jnp.einsum('ic...,jc...->ij', j, j)
              for j in jax.tree.leaves(jac)) / C_NTK
    return out @ out.T / out.shape[-1], ntk

  rng = np.random.default_rng(seed)
  draws = [one(draw(rng, sh), jax.random.PRNGKey(1000 + s)) for s in range(n_samples)]
  return np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])


def check(analytic, draws, n_hidden, width):
  mc_check.check_against_mc(analytic, draws, n_hidden, width, K_SE, C_WIDTH)


# ----------------------------------------------------------------------------
# Closed forms.


def test_dropout_before_readout_scales_same_entries():
  """`readout(m·h/keep)`: the kernel of `readout(h)` with its diagonal (same
  input) times 1/keep, the NTK likewise; entries of x1 against a
  different x2 are unchanged, cov1 and cov2 scaled."""
  keep = 0.6

  def net(p, x, rng=None):
    h = jax.nn.relu(dense(*p['l0'], x))
    if rng is not None:
      h = where_dropout(h, rng, keep)
    return h @ p['out'][0] * SW / np.sqrt(h.shape[-1])

  sh = shapes(64, depth=1)
  base = kernels(net, sh)
  drop = kernels(net, sh, rng=KEY)
  scale = 1 + (1 / keep - 1) * np.eye(N)
  np.testing.assert_allclose(drop.nngp, base.nngp * scale, rtol=1e-12)
  np.testing.assert_allclose(drop.ntk, base.ntk * scale, rtol=1e-12)
  x2 = X[:3] + 0.1
  params = draw(np.random.default_rng(99), sh)
  kfn = iw.kernelize(net, params, param_stats=unit_stats(sh))
  b, d = kfn(X, x2, None), kfn(X, x2, None, rng=KEY)
  np.testing.assert_allclose(d.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(d.ntk, b.ntk, rtol=1e-12)
  np.testing.assert_allclose(d.cov1, b.cov1 / keep, rtol=1e-12)
  np.testing.assert_allclose(d.cov2, b.cov2 / keep, rtol=1e-12)


def test_relu_after_dropout_closed_form():
  """ReLU is positively homogeneous: `relu(m·h/keep) = m·relu(h)/keep`, so a
  dropout before it scales the same-input moments by 1/keep and keeps the
  others (a mixture over the mask, not a Gaussian of the scaled variance)."""
  keep = 0.7

  def net(p, x, rng=None):
    h = dense(*p['l0'], x)
    if rng is not None:
      h = where_dropout(h, rng, keep)
    return dense(*p['out'], jax.nn.relu(h))

  sh = shapes(64, depth=1)
  base, drop = kernels(net, sh), kernels(net, sh, rng=KEY)
  scale = 1 + (1 / keep - 1) * np.eye(N)
  # Only the part through relu(h) is scaled: the readout's bias adds SB².
  np.testing.assert_allclose(drop.nngp - SB ** 2, (base.nngp - SB ** 2) * scale, rtol=1e-10)


def test_identity_without_key_and_deterministic():
  """Without a key (or with Flax's deterministic=True) dropout is the identity."""
  sh = shapes(64)
  k0 = kernels(mlp, sh)
  k1 = kernels(functools.partial(mlp, keep=(1.0, 1.0)), sh, rng=KEY)
  np.testing.assert_allclose(k1.nngp, k0.nngp, rtol=1e-12)
  np.testing.assert_allclose(k1.ntk, k0.ntk, rtol=1e-12)


def test_kernel_does_not_depend_on_the_key_and_jits():
  sh = shapes(64)
  params = draw(np.random.default_rng(99), sh)
  kfn = iw.kernelize(mlp, params, param_stats=unit_stats(sh))
  a = kfn(X, None, 'nngp', rng=jax.random.PRNGKey(1))
  b = kfn(X, None, 'nngp', rng=jax.random.key(2))
  c = jax.jit(kfn, static_argnums=2)(X, None, 'nngp', rng=jax.random.PRNGKey(3))
  np.testing.assert_allclose(a, b, rtol=1e-13)
  np.testing.assert_allclose(a, c, rtol=1e-12)
  assert not np.allclose(a, kfn(X, None, 'nngp'), rtol=1e-2)


# ----------------------------------------------------------------------------
# Monte Carlo of finite networks.


@pytest.mark.parametrize('phi', [jax.nn.relu, jnp.tanh], ids=['relu', 'tanh'])
@pytest.mark.parametrize('before_phi', [False, True], ids=['after_phi', 'before_phi'])
def test_mlp_with_dropout_matches_monte_carlo(phi, before_phi):
  """Masks between dense layers (`where` and product forms, keep 0.5 and 0.8),
  and masks before the nonlinearity (the mixture; tanh by quadrature)."""
  width = 512
  f = functools.partial(mlp, phi=phi, before_phi=before_phi)
  sh = shapes(width)
  k = kernels(f, sh, rng=KEY)
  nngp, ntk = monte_carlo(f, sh)
  check(k.nngp, nngp, 2, width)
  check(k.ntk, ntk, 2, width)
  # Non-vacuous: the kernel without masks is caught by the same check.
  k0 = kernels(f, sh)
  with pytest.raises(AssertionError):
    check(k0.nngp, nngp, 2, width)
  for m in (k.nngp, k.ntk):
    np.testing.assert_allclose(m, m.T, rtol=1e-12)
    assert np.linalg.eigvalsh(m).min() > -1e-10


class FlaxMLP(nn.Module):
  width: int
  rate: float = 0.4

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = nn.initializers.normal(1.0)
    for _ in range(2):
      x = nn.Dense(self.width, kernel_init=init, bias_init=init)(x) / np.sqrt(x.shape[-1])
      x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
    return nn.Dense(C, kernel_init=init, bias_init=init)(x) / np.sqrt(x.shape[-1])


def test_flax_dropout_matches_monte_carlo():
  """Flax's `nn.Dropout` (`rngs={'dropout': key}`, fold_in per module) in an
  MLP: the same kernel as the plain-JAX masks, and Monte Carlo."""
  width = 512
  model = FlaxMLP(width)
  variables = model.init(jax.random.PRNGKey(0), X)
  stats = jax.tree.map(lambda a: iw.ParamStats(0.0, 1.0), variables)
  kfn = iw.kernelize(model.apply, variables, param_stats=stats)
  k = kfn(X, None, ('nngp', 'ntk'), train=True, rngs={'dropout': KEY})
  k_eval = kfn(X, None, 'nngp', train=False)
  np.testing.assert_allclose(kfn(X, None, 'nngp'), k_eval, rtol=1e-12)

  def plain(p, x, rng=None):
    h = x
    keys = jax.random.split(rng, 2)
    for i in range(2):
      w, b = p[f'l{i}']
      h = where_dropout(jax.nn.relu((h @ w + b) / np.sqrt(h.shape[-1])), keys[i], 0.6)
    w, b = p['out']
    return (h @ w + b) / np.sqrt(h.shape[-1])

  sh = shapes(width)
  ref = iw.kernelize(plain, draw(np.random.default_rng(1), sh), param_stats=unit_stats(sh))(
      X, None, ('nngp', 'ntk'), rng=KEY)
  np.testing.assert_allclose(k.nngp, ref.nngp, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, ref.ntk, rtol=1e-10)

  apply = lambda v, x, rng: model.apply(v, x, train=True, rngs={'dropout': rng})
  rng = np.random.default_rng(0)

  @jax.jit
  def one(v, key):
    out = apply(v, X, key)
    jac = jax.jacrev(lambda q: apply(q, X, key)[:, :C_NTK])(v)
    ntk = sum(jnp.einsum('ic...,jc...->ij', j.reshape(j.shape[:2] + (-1,)),
                         j.reshape(j.shape[:2] + (-1,))) for j in jax.tree.leaves(jac)) / C_NTK
    return out @ out.T / C, ntk

  draws = [one(jax.tree.map(lambda a: rng.standard_normal(a.shape), variables),
               jax.random.PRNGKey(2000 + s)) for s in range(64)]
  check(k.nngp, np.stack([d[0] for d in draws]), 2, width)
  check(k.ntk, np.stack([d[1] for d in draws]), 2, width)


def test_float32():
  sh = shapes(64)
  for before_phi in (False, True):
    f = functools.partial(mlp, before_phi=before_phi)
    k32 = kernels(f, sh, dtype=np.float32, rng=KEY)
    k64 = kernels(f, sh, rng=KEY)
    assert k32.nngp.dtype == jnp.float32
    np.testing.assert_allclose(k32.nngp, k64.nngp, rtol=2e-5)
    np.testing.assert_allclose(k32.ntk, k64.ntk, rtol=2e-5)


# ----------------------------------------------------------------------------
# Neural Tangents 0.6.5's stax.Dropout.

_NT = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'dropout_nt.npz'))


@pytest.mark.parametrize('name', list(DROPOUT))
def test_stax_dropout_matches_nt(name):
  expr, inputs = DROPOUT[name]
  _, _, kernel_fn = eval(expr, dict(vars(stax), jnp=jnp))  # noqa: S307
  x1, x2 = INPUTS[inputs]()
  same, cross = kernel_fn(x1, None), kernel_fn(x1, x2)
  for tag, k in (('same', same), ('cross', cross)):
    for g in ('nngp', 'ntk'):
      ref = _NT[f'{name}/{tag}/{g}']
      assert getattr(k, g).shape == ref.shape
      np.testing.assert_allclose(getattr(k, g), ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
  for g in ('cov1', 'cov2'):
    np.testing.assert_allclose(getattr(cross, g), _NT[f'{name}/cross/{g}'], rtol=1e-10)


def test_stax_dropout_apply_and_errors():
  init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(16), stax.Relu(), stax.Dropout(0.5),
                                             stax.Dense(1))
  _, params = init_fn(jax.random.PRNGKey(0), X.shape)
  out = apply_fn(params, X, rng=jax.random.PRNGKey(1))
  assert out.shape == (N, 1)
  with pytest.raises(ValueError, match='PRNG key'):
    apply_fn(params, X)
  # The kernel does not depend on the key.
  np.testing.assert_allclose(kernel_fn(X, None, 'nngp', rng=jax.random.PRNGKey(3)),
                             kernel_fn(X, None, 'nngp'), rtol=1e-13)
  with pytest.raises(ValueError, match='keep|rate'):
    stax.Dropout(0.0)
  with pytest.raises(ValueError, match='mode'):
    stax.Dropout(0.5, 'eval')
  with pytest.raises(iw.InfwidthError, match='input layer'):
    stax.Dropout(0.5)[2](X, None, 'nngp')


def test_blocked_spatial_kernel_with_dropout():
  """Spatial kernels of one batch are not computed on blocks of pairs when
  masks are drawn (its diagonal blocks pair the same inputs): the kernel of
  20 images equals its blocks computed separately."""
  _, _, kernel_fn = stax.serial(stax.Conv(3, (3, 3), padding='SAME'), stax.Relu(),
                                stax.Dropout(0.6), stax.Conv(2, (3, 3), padding='SAME'),
                                stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
  x = np.random.default_rng(0).standard_normal((20, 8, 8, 2))
  k = kernel_fn(x, None, 'nngp')
  np.testing.assert_allclose(k[:5, :5], kernel_fn(x[:5], None, 'nngp'), rtol=1e-10)
  np.testing.assert_allclose(k[:5, 5:], kernel_fn(x[:5], x[5:], 'nngp'), rtol=1e-10)


# ----------------------------------------------------------------------------
# What is refused, and the fallback.


def _net_with(noise):
  def net(p, x, rng=None):
    h = jax.nn.relu(dense(*p['l0'], x))
    return dense(*p['out'], noise(h, rng))
  return net


@pytest.mark.parametrize('noise,reason', [
    (lambda h, k: jnp.where(jax.random.bernoulli(k, 0.5, (h.shape[0], 1)), h / 0.5, 0),
     'shared by all channels'),
    (lambda h, k: h * (1 + 0.3 * jax.random.normal(k, h.shape)), 'not a mask'),
    (lambda h, k: (lambda m: h * m * m)(jax.random.bernoulli(k, 0.5, h.shape).astype(h.dtype)),
     'already'),
])
def test_refused_with_a_reason_and_fallback(noise, reason):
  sh = shapes(64, depth=1)
  params = draw(np.random.default_rng(99), sh)
  kfn = iw.kernelize(_net_with(noise), params, param_stats=unit_stats(sh))
  with pytest.raises(iw.UnsupportedPrimitiveError, match=reason):
    kfn(X, None, 'nngp', rng=KEY)
  mc = iw.kernelize(_net_with(noise), params, param_stats=unit_stats(sh),
                    fallback='monte_carlo', n_samples=4, key=jax.random.PRNGKey(0))
  with pytest.warns(UserWarning):
    assert mc(X, None, 'nngp', rng=KEY).shape == (N, N)


def test_dropout_on_the_inputs_is_refused():
  def net(p, x, rng=None):
    return dense(*p['out'], jax.nn.relu(dense(*p['l0'], where_dropout(x, rng, 0.5))))
  sh = shapes(64, depth=1)
  kfn = iw.kernelize(net, draw(np.random.default_rng(99), sh), param_stats=unit_stats(sh))
  with pytest.raises(iw.UnsupportedPrimitiveError, match='inputs'):
    kfn(X, None, 'nngp', rng=KEY)


def test_monte_carlo_fallback_draws_fresh_masks():
  """The fallback averages over masks too: a mask shared by the channels of an
  input (refused) before the readout has, on average over its draws, the
  same-input moments doubled at keep 0.5 (each draw gives 0 or 4 times)."""
  noise = lambda h, k: jnp.where(jax.random.bernoulli(k, 0.5, (h.shape[0], 1)), h / 0.5, 0)

  def net(p, x, rng=None):
    h = jax.nn.relu(dense(*p['l0'], x))
    h = noise(h, rng) if rng is not None else h
    return h @ p['out'][0] / np.sqrt(h.shape[-1])

  sh = shapes(64, depth=1)
  params = draw(np.random.default_rng(99), sh)
  base = iw.kernelize(net, params, param_stats=unit_stats(sh))(X, None, 'nngp')
  mc = iw.kernelize(net, params, param_stats=unit_stats(sh), fallback='monte_carlo',
                    n_samples=256, key=jax.random.PRNGKey(0))
  with pytest.warns(UserWarning, match='monte_carlo'):
    k = mc(X, None, 'nngp', rng=KEY)
  ratio = np.diag(k) / np.diag(base)
  assert np.all((ratio > 1.5) & (ratio < 2.5)), ratio   # 2 ± 4 SE (SE 0.125)


def test_haiku_and_equinox_dropout():
  """`hk.dropout(hk.next_rng_key(), …)` and `eqx.nn.Dropout` under `vmap` with
  a key per example (an array of keys): before the readout, the kernel without
  dropout with its same-input entries doubled (keep 0.5)."""
  import equinox as eqx
  import haiku as hk

  def f(x, train):
    h = jax.nn.relu(hk.Linear(128)(x))
    if train:
      h = hk.dropout(hk.next_rng_key(), 0.5, h)
    return hk.Linear(1)(h)

  t = hk.transform(f)
  p = t.init(jax.random.PRNGKey(0), X, True)
  k0 = iw.kernelize(lambda p, x: t.apply(p, None, x, False), p)(X, None, 'nngp')
  k1 = iw.kernelize(lambda p, x, rng: t.apply(p, rng, x, True), p)(X, None, 'nngp', rng=KEY)
  scale = 1 + np.eye(N)
  np.testing.assert_allclose(k1, k0 * scale, rtol=1e-10)

  class Net(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear
    drop: eqx.nn.Dropout

    def __call__(self, x, key):
      return self.l2(self.drop(jax.nn.relu(self.l1(x)), key=key))

    def __init__(self, key, p):
      k1, k2 = jax.random.split(key)
      self.l1 = eqx.nn.Linear(D, 128, key=k1)
      self.l2 = eqx.nn.Linear(128, 1, use_bias=False, key=k2)  # no bias: the whole kernel scales
      self.drop = eqx.nn.Dropout(p)

  def kernel(p):
    params, static = eqx.partition(Net(jax.random.PRNGKey(0), p), eqx.is_array)

    def apply(q, x, rng):
      return jax.vmap(eqx.combine(q, static))(x, jax.random.split(rng, x.shape[0]))
    return iw.kernelize(apply, params)(X, None, 'nngp', rng=KEY)

  np.testing.assert_allclose(kernel(0.5), kernel(0.0) * scale, rtol=1e-10)


def _layer_norm(h):
  m = h.mean(-1, keepdims=True)
  return (h - m) / jnp.sqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-6)


def test_layernorm_after_dropout_matches_monte_carlo():
  """LayerNorm's statistics of a masked value (means over the channels of
  `m·h` and of its square: the mixture per channel), then a ReLU."""
  width = 512

  def net(p, x, rng=None):
    h = dense(*p['l0'], x)
    if rng is not None:
      h = where_dropout(h, rng, 0.5)
    return dense(*p['out'], jax.nn.relu(_layer_norm(h)))

  sh = shapes(width, depth=1)
  k = kernels(net, sh, rng=KEY)
  nngp, ntk = monte_carlo(net, sh)
  check(k.nngp, nngp, 1, width)
  check(k.ntk, ntk, 1, width)


@pytest.mark.slow
def test_cnn_with_dropout_before_relu_matches_monte_carlo():
  """Masks on a convolution's output, before a ReLU (the mixture at each
  position), then a convolution and global average pooling: full spatial
  blocks, where the masks of different positions are independent."""
  width = 256
  init_fn, apply_fn, kernel_fn = stax.serial(
      stax.Conv(width, (3, 3), padding='SAME', W_std=1.5, b_std=0.2), stax.Dropout(0.6),
      stax.Relu(), stax.Conv(width, (3, 3), W_std=1.5), stax.Relu(), stax.GlobalAvgPool(),
      stax.Dense(C))
  x = np.random.default_rng(0).standard_normal((3, 6, 6, 2))
  k = kernel_fn(x, None, 'nngp')

  @jax.jit
  def one(key):
    kp, kd = jax.random.split(key)
    _, params = init_fn(kp, x.shape)
    out = apply_fn(params, x, rng=kd)
    return out @ out.T / C

  draws = np.stack([one(jax.random.PRNGKey(s)) for s in range(64)])
  check(k, draws, 2, width)
