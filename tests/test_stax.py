"""infwidth.stax against Neural Tangents 0.6.5 (fixtures) and Monte Carlo of finite networks."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth import stax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'fixtures'))
from stax_architectures import ARCHITECTURES, INPUTS  # noqa: E402

_NT = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'stax_nt.npz'))
_META = json.loads(str(_NT['meta']))

# Where infwidth's kernel is not NT's by design (tested separately below).
_NOT_NT = {
    'correlated_sum',  # NT assumes FanInSum inputs independent: 2K instead of 4K.
    'gelu_tanh',  # NT's Gelu kernel ignores `approximate` (it is the exact-GELU kernel).
    'wide_resnet',  # slow in float64; test_wide_resnet below.
}
# Compile-heavy cases whose options other default cases cover (run with -m slow).
_SLOW = {'readme_cnn_gap', 'avgpool_circular', 'conv_transpose_same'}
_MATCHING = [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
             for n in ARCHITECTURES if n not in _NOT_NT]


def _layer(name):
  expr, inputs = ARCHITECTURES[name]
  return eval(expr, dict(vars(stax), jnp=jnp)), INPUTS[inputs]()  # noqa: S307


def _rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize('name', _MATCHING)
def test_kernel_matches_nt(name):
  (_, _, kernel_fn), (x1, x2) = _layer(name)
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    ref = _NT[f'{name}/{g}']
    assert getattr(k, g).shape == ref.shape
    assert _rel_err(getattr(k, g), ref) < 1e-6, g


@pytest.mark.parametrize('name', list(ARCHITECTURES))
def test_init_and_apply_shapes_match_nt(name):
  (init_fn, apply_fn, _), (x1, _) = _layer(name)
  box = {}

  def init(key):
    box['out_shape'], params = init_fn(key, x1.shape)
    return params

  params = jax.eval_shape(init, jax.random.PRNGKey(1))
  out_shape = box['out_shape']
  meta = _META[name]
  assert list(out_shape) == meta['out_shape']
  assert [list(np.shape(p)) for p in jax.tree_util.tree_leaves(params)] == meta['param_shapes']
  assert list(jax.eval_shape(apply_fn, params, x1).shape) == meta['apply_shape']


def test_parameter_distributions():
  """Standard parameterization draws N(0, W_std^2 / (fan_in / s0)) weights, N(0, b_std^2) biases."""
  init_fn, _, _ = stax.Dense(400, 1.5, 0.3, parameterization='standard', s=(2, 3))
  _, (W, b) = init_fn(jax.random.PRNGKey(0), (3, 200))
  assert W.shape == (200, 1200) and b.shape == (1, 1200)
  np.testing.assert_allclose(np.var(W), 1.5**2 / 100, rtol=0.02)
  np.testing.assert_allclose(np.var(b), 0.3**2, rtol=0.1)
  init_fn, _, _ = stax.Conv(300, (3, 3), W_std=2., b_std=0.5)
  _, (W, b) = init_fn(jax.random.PRNGKey(0), (1, 8, 8, 40))
  assert W.shape == (3, 3, 40, 300) and b.shape == (1, 1, 1, 300)
  np.testing.assert_allclose(np.var(W), 1., rtol=0.02)


def test_correlated_branches_are_exact():
  """`x + x` has kernel 4K; NT's FanInSum assumes independent inputs and gives 2K."""
  (init_fn, apply_fn, kernel_fn), (x1, x2) = _layer('correlated_sum')
  nngp = kernel_fn(x1, x2, 'nngp')
  nt = _NT['correlated_sum/nngp']
  np.testing.assert_allclose(nngp, 2 * nt, rtol=1e-12)
  # The network is linear: E[f f'] = 4 (x.x'/d + 0.1^2) at any width.
  np.testing.assert_allclose(nngp, 4 * (x1 @ x2.T / 5 + 0.01), rtol=1e-12)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)

  def sample(key):
    _, params = init_fn(key, x1.shape)
    return apply_fn(params, x1) @ apply_fn(params, x2).T

  samples = np.asarray(jax.vmap(sample)(keys))
  mean, se = samples.mean(0), samples.std(0) / np.sqrt(len(samples))
  assert np.all(np.abs(mean - nngp) < 5 * se)
  assert np.max(np.abs(mean - nt) / se) > 10


def _gauss_expect(f, cov, deg=80):
  """E[f(u) f(v)] for (u, v) ~ N(0, cov) by tensor Gauss-Hermite quadrature."""
  t, w = np.polynomial.hermite_e.hermegauss(deg)
  w = w / w.sum()
  L = np.linalg.cholesky(cov)
  z = np.stack(np.meshgrid(t, t, indexing='ij'), -1) @ L.T
  return np.sum(np.outer(w, w) * f(z[..., 0]) * f(z[..., 1]))


def test_gelu_approximate_kernel():
  """NT returns the exact-GELU kernel for Gelu(approximate=True); infwidth derives
  the tanh-approximation's own kernel (checked by quadrature)."""
  (_, _, kernel_fn), (x1, x2) = _layer('gelu_tanh')
  nngp = kernel_fn(x1, x2, 'nngp')
  gelu = lambda z: np.asarray(jax.nn.gelu(jnp.asarray(z), approximate=True))
  for i, j in ((0, 0), (1, 0), (2, 1)):
    k11 = 1.3**2 * x1[i] @ x1[i] / 5 + 0.04
    k22 = 1.3**2 * x2[j] @ x2[j] / 5 + 0.04
    k12 = 1.3**2 * x1[i] @ x2[j] / 5 + 0.04
    ref = 0.81 * _gauss_expect(gelu, np.array([[k11, k12], [k12, k22]])) + 0.01
    np.testing.assert_allclose(nngp[i, j], ref, rtol=1e-6)
  assert 1e-6 < _rel_err(nngp, _NT['gelu_tanh/nngp']) < 1e-3


def test_jit_symmetric_psd_and_get_none():
  (_, _, kernel_fn), (x1, _) = _layer('conv_flatten')
  k = jax.jit(kernel_fn, static_argnames='get')(x1, None, ('nngp', 'ntk'))
  k_eager = kernel_fn(x1, x1, ('nngp', 'ntk'))
  for a, b in zip(k, k_eager):
    np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(a, a.T, rtol=1e-12)
    assert np.linalg.eigvalsh(np.asarray(a)).min() > -1e-12
  full = kernel_fn(x1, None)
  assert isinstance(full, iw.Kernel) and full.shape1 == (2, 1)
  np.testing.assert_allclose(full.nngp, k.nngp, rtol=1e-12)


def test_kernel_composition():
  """kernel_fn2(kernel_fn1(x1, x2)) is the kernel of serial(net1, net2)."""
  net1 = stax.serial(stax.Dense(8, 1.4, 0.2), stax.Relu())
  net2 = stax.serial(stax.Dense(8, 1.1, 0.3), stax.Erf(), stax.Dense(1, 1., 0.1))
  x1, x2 = INPUTS['vec']()
  k1 = net1[2](x1, x2)
  composed = net2[2](k1, get=('nngp', 'ntk'))
  whole = stax.serial(net1, net2)[2](x1, x2, ('nngp', 'ntk'))
  for a, b in zip(composed, whole):
    np.testing.assert_allclose(a, b, rtol=1e-10)


def _monte_carlo(init_fn, apply_fn, x1, x2, n_samples, seed=0):
  """Per-draw empirical NNGP (averaged over output units) and NTK of a scalar readout."""
  keys = jax.random.split(jax.random.PRNGKey(seed), n_samples)

  def one(key):
    _, params = init_fn(key, x1.shape)
    f1, f2 = apply_fn(params, x1), apply_fn(params, x2)
    nngp = f1 @ f2.T / f1.shape[-1]
    j1 = jax.jacobian(lambda p: apply_fn(p, x1)[:, 0])(params)
    j2 = jax.jacobian(lambda p: apply_fn(p, x2)[:, 0])(params)
    ntk = sum(jnp.tensordot(a, b, (tuple(range(1, a.ndim)),) * 2)
              for a, b in zip(jax.tree_util.tree_leaves(j1), jax.tree_util.tree_leaves(j2)))
    return nngp, ntk

  nngp, ntk = jax.lax.map(one, keys)
  return [(np.mean(s, 0), np.std(s, 0) / np.sqrt(n_samples)) for s in (nngp, ntk)]


@pytest.mark.parametrize('parameterization', ['ntk', 'standard'])
def test_monte_carlo_mlp(parameterization):
  width = 512
  init_fn, apply_fn, kernel_fn = stax.serial(
      stax.Dense(width, 1.5, 0.2, parameterization=parameterization), stax.Relu(),
      stax.Dense(width, 1.2, 0.1, parameterization=parameterization), stax.Erf(),
      stax.Dense(4, 1.1, 0.1, parameterization=parameterization))
  x1, x2 = INPUTS['vec']()
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for (mean, se), ref in zip(_monte_carlo(init_fn, apply_fn, x1, x2, 48), k):
    assert np.all(np.abs(mean - ref) < 4 * se + 0.02 * np.abs(ref).max()), (mean, ref, se)


def test_monte_carlo_cnn():
  width = 128
  init_fn, apply_fn, kernel_fn = stax.serial(
      stax.Conv(width, (3, 3), padding='SAME', W_std=1.3, b_std=0.1), stax.Relu(),
      stax.Conv(width, (2, 2), (2, 2)), stax.Relu(), stax.Flatten(), stax.Dense(2, 1., 0.1))
  x1, x2 = INPUTS['img']()
  x1, x2 = x1[:, :4, :4], x2[:, :4, :4]
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for (mean, se), ref in zip(_monte_carlo(init_fn, apply_fn, x1, x2, 32), k):
    assert np.all(np.abs(mean - ref) < 4 * se + 0.03 * np.abs(ref).max()), (mean, ref, se)


@pytest.mark.slow
def test_wide_resnet():
  """NT README's WideResnet(block_size=4, k=1) on 32x32x3 inputs, jitted."""
  (_, _, kernel_fn), (x1, x2) = _layer('wide_resnet')
  kernel_fn = jax.jit(kernel_fn, static_argnames='get')
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    assert _rel_err(getattr(k, g), _NT[f'wide_resnet/{g}']) < 1e-6
  kk = kernel_fn(x1, None, 'nngp')
  assert np.all(np.isfinite(kk)) and np.linalg.eigvalsh(np.asarray(kk)).min() > 0


def test_small_residual_cnn_matches_independent_branches():
  """One WideResnet block: the shortcut is uncorrelated with the fresh-weight main
  branch, so the kernel is the sum of the two branches' kernels (as in NT)."""
  main = stax.serial(stax.Relu(), stax.Conv(4, (3, 3), padding='SAME'))
  stem = stax.Conv(4, (3, 3), padding='SAME', b_std=0.1)
  head = stax.serial(stax.GlobalAvgPool(), stax.Dense(1))
  x1, x2 = INPUTS['img']()
  res = stax.serial(stem, stax.FanOut(2), stax.parallel(main, stax.Identity()),
                    stax.FanInSum(), head)[2](x1, x2, 'nngp')
  a = stax.serial(stem, main, head)[2](x1, x2, 'nngp')
  b = stax.serial(stem, head)[2](x1, x2, 'nngp')
  np.testing.assert_allclose(res, a + b, rtol=1e-10)


def test_errors():
  with pytest.raises(iw.InfwidthError, match='infwidth.stax layers'):
    stax.serial(stax.Dense(3), (lambda k, s: (s, ()), lambda p, x: x, None))
  with pytest.raises(iw.InfwidthError, match='needs fn'):
    stax.Elementwise(nngp_fn=lambda c12, c11, c22: c12)
  with pytest.raises(ValueError, match='padding'):
    stax.Conv(3, (3, 3), padding='REFLECT')
  with pytest.raises(ValueError, match='Parameterization'):
    stax.Dense(3, parameterization='mup')


def test_float32():
  (_, _, kernel_fn), (x1, x2) = _layer('dense_relu_standard')
  k = kernel_fn(x1.astype(np.float32), x2.astype(np.float32), ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    assert getattr(k, g).dtype == np.float32
    assert _rel_err(getattr(k, g), _NT[f'dense_relu_standard/{g}']) < 1e-5


def test_flatten_without_readout_averages_over_pixels():
  """NT's kernel of a Flatten output averages the pixel-diagonal kernel over
  pixels (tests/test_flatten_readout.py checks it against Monte Carlo)."""
  body = [stax.Conv(1, (3, 3), padding='SAME'), stax.Relu()]
  x1, _ = INPUTS['img']()
  k = stax.serial(*body, stax.Flatten())[2](x1, None, 'nngp')
  spatial = stax.serial(*body)[2](x1, None, 'nngp', diagonal_spatial=True)
  np.testing.assert_allclose(k, spatial.mean((-2, -1)), rtol=1e-10)


def test_kernel_composition_after_scalar_output():
  net1 = stax.serial(stax.Dense(8, 1.4, 0.2), stax.Relu(), stax.Dense(1))
  net2 = stax.serial(stax.Dense(8, 1.1, 0.3), stax.Relu(), stax.Dense(1))
  x1, x2 = INPUTS['vec']()
  composed = net2[2](net1[2](x1, x2), get='nngp')
  np.testing.assert_allclose(composed, stax.serial(net1, net2)[2](x1, x2, 'nngp'), rtol=1e-10)
