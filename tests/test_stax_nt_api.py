"""NT 0.6.5 stax layers beyond the core set: kernels against NT fixtures
(tests/fixtures/make_stax_api_nt.py), shapes against NT's init/apply, and
Monte Carlo of the finite networks."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infwidth import stax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'fixtures'))
from mc_check import check_against_mc  # noqa: E402
from stax_architectures import API_ARCHITECTURES, INPUTS, input_shape  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

_NT = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'stax_api_nt.npz'))
_META = json.loads(str(_NT['meta']))

# Where infwidth's kernel is not NT's by design (tested separately below).
_NOT_NT = {
    'hermite3_not_unit',  # NT's Hermite kernel assumes unit-variance inputs.
    'fan_in_prod_square',  # NT's FanInProd assumes independent inputs.
    'fan_in_prod_relu_erf',
    'index_batch',  # Indexing the batch axis: not yet (see below).
    'resize_nearest_nonsquare',  # NT resizes H by W's size and W by H's (see below).
    'resize_linear',  # The same in NT (see below).
}


def _layer(name):
  expr, inputs = API_ARCHITECTURES[name]
  return eval(expr, dict(vars(stax), jnp=jnp)), INPUTS[inputs]()  # noqa: S307


def _rel_err(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize('name', [n for n in API_ARCHITECTURES if n not in _NOT_NT])
def test_kernel_matches_nt(name):
  (_, _, kernel_fn), (x1, x2) = _layer(name)
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    ref = _NT[f'{name}/{g}']
    assert getattr(k, g).shape == ref.shape
    assert _rel_err(getattr(k, g), ref) < 1e-6, (g, _rel_err(getattr(k, g), ref))


@pytest.mark.parametrize('name', list(API_ARCHITECTURES))
def test_init_and_apply_shapes_match_nt(name):
  (init_fn, apply_fn, _), (x1, _) = _layer(name)
  box = {}

  def init(key):
    box['out_shape'], params = init_fn(key, input_shape(x1))
    return params

  params = jax.eval_shape(init, jax.random.PRNGKey(1))
  meta = _META[name]
  assert list(box['out_shape']) == meta['out_shape']
  assert [list(np.shape(p)) for p in jax.tree_util.tree_leaves(params)] == meta['param_shapes']
  # NT's ExpNormalized has no finite network (its apply_fn raises); ours does.
  want = meta['apply_shape'] or meta['out_shape']
  assert list(jax.eval_shape(apply_fn, params, x1).shape) == want


def _gauss_expect(f, g, cov, deg=80):
  """E[f(u) g(v)] for (u, v) ~ N(0, cov) by tensor Gauss-Hermite quadrature."""
  t, w = np.polynomial.hermite_e.hermegauss(deg)
  w = w / w.sum()
  z = np.stack(np.meshgrid(t, t, indexing='ij'), -1) @ np.linalg.cholesky(cov).T
  return np.sum(np.outer(w, w) * f(z[..., 0]) * g(z[..., 1]))


def test_hermite_exact_at_any_variance():
  """NT's Hermite kernel is ρ^n, exact only for unit-variance inputs; infwidth's
  is E[He_n(u) He_n(v)] / n! at the actual variances (quadrature oracle)."""
  (_, _, kernel_fn), (x1, x2) = _layer('hermite3_not_unit')
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  he3 = lambda z: (z**3 - 3 * z) / np.sqrt(6)
  dhe3 = lambda z: (3 * z**2 - 3) / np.sqrt(6)
  for i, j in ((0, 0), (1, 0), (2, 1)):
    k11 = 1.69 * x1[i] @ x1[i] / 5 + 0.04
    k22 = 1.69 * x2[j] @ x2[j] / 5 + 0.04
    k12 = 1.69 * x1[i] @ x2[j] / 5 + 0.04
    cov = np.array([[k11, k12], [k12, k22]])
    nngp = 0.81 * _gauss_expect(he3, he3, cov) + 0.01
    np.testing.assert_allclose(k.nngp[i, j], nngp, rtol=1e-9)
    # NTK: σ²·T + σ_b² + σ²·Ṫ·Θ₁ with Θ₁ = K₁ (first layer, NTK parameterization).
    ntk = nngp + 0.81 * _gauss_expect(dhe3, dhe3, cov) * k12
    np.testing.assert_allclose(k.ntk[i, j], ntk, rtol=1e-9)
  assert _rel_err(k.nngp, _NT['hermite3_not_unit/nngp']) > 0.1


# Monte Carlo of the finite networks: NNGP of a readout of width-`n` hidden
# layers, averaged over draws (DESIGN §6).
_MC = {
    'monomial3': 'Monomial(3)',
    'rectified_monomial2': 'RectifiedMonomial(2)',
    'polynomial': 'Polynomial([0.3, -0.5, 0.2, 0.1])',
    'hermite3': 'Hermite(3)',
    'gabor': 'Gabor()',
    'exp_normalized': 'ExpNormalized(0.5, -0.3)',
    'fan_in_prod': 'FanOut(2), parallel(Relu(), Erf()), FanInProd()',
}


@pytest.mark.parametrize('name', list(_MC))
def test_monte_carlo_nngp(name):
  width, n_draws = 512, 1024
  pre = 'LayerNorm(), ' if name == 'hermite3' else ''  # NT's unit-variance inputs
  init_fn, apply_fn, kernel_fn = eval(  # noqa: S307
      f'serial(Dense({width}, 1.3, 0.2), {pre}{_MC[name]}, Dense(4, 0.9, 0.1))', vars(stax))
  x1, x2 = INPUTS['vec']()
  x = np.concatenate([x1, x2])
  nngp = kernel_fn(x, None, 'nngp')

  def draw(key):
    _, params = init_fn(key, x.shape)
    f = apply_fn(params, x)
    return f @ f.T / f.shape[-1]

  draws = jax.vmap(draw)(jax.random.split(jax.random.PRNGKey(0), n_draws))
  # One hidden layer: the mean over draws is the kernel up to O(1/n) (from the
  # normalisation statistics of LayerNorm and ExpNormalized, nothing otherwise).
  check_against_mc(nngp, draws, n_hidden=1, width=width, k_se=5, c_width=1.0, per_entry=False)


def _first_layer_cov(x1, x2, i, j):
  """Covariance of Dense(8, 1.3, 0.2)'s outputs at x1[i], x2[j] (NTK parameterization)."""
  k = lambda a, b: 1.69 * a @ b / 5 + 0.04
  return np.array([[k(x1[i], x1[i]), k(x1[i], x2[j])], [k(x1[i], x2[j]), k(x2[j], x2[j])]])


def test_fan_in_prod_of_correlated_branches():
  """`h * h` has kernel E[h² h'²] = K₁₁K₂₂ + 2K₁₂² (Isserlis); NT's FanInProd
  multiplies the branches' kernels as if independent: K₁₂²."""
  (_, _, kernel_fn), (x1, x2) = _layer('fan_in_prod_square')
  k = kernel_fn(x1, x2, ('nngp', 'ntk'))
  for i in range(3):
    for j in range(2):
      c = _first_layer_cov(x1, x2, i, j)
      nngp = 0.81 * (c[0, 0] * c[1, 1] + 2 * c[0, 1]**2) + 0.01
      np.testing.assert_allclose(k.nngp[i, j], nngp, rtol=1e-10)
      # Readout terms plus 0.81·E[2h·2h']·Θ₁ with Θ₁ = K₁₂ (first layer).
      np.testing.assert_allclose(k.ntk[i, j], nngp + 0.81 * 4 * c[0, 1]**2, rtol=1e-10)
      np.testing.assert_allclose(_NT['fan_in_prod_square/nngp'][i, j],
                                 0.81 * c[0, 1]**2 + 0.01, rtol=1e-10)
  (_, _, kernel_fn), (x1, x2) = _layer('fan_in_prod_relu_erf')
  nngp = kernel_fn(x1, x2, 'nngp')
  for i, j in ((0, 0), (2, 1)):
    want = 0.81 * _relu_erf_expect(_first_layer_cov(x1, x2, i, j)) + 0.01
    np.testing.assert_allclose(nngp[i, j], want, rtol=1e-7)
  assert _rel_err(nngp, _NT['fan_in_prod_relu_erf/nngp']) > 0.1


def _relu_erf_expect(cov):
  """E[f(u) f(v)], f(z) = relu(z) erf(z), (u, v) ~ N(0, cov): adaptive 2-D
  quadrature over u > 0, v > 0 (f vanishes elsewhere)."""
  from scipy import integrate, special, stats
  f = lambda z: z * special.erf(z)
  dist = stats.multivariate_normal(np.zeros(2), cov)
  val, _ = integrate.dblquad(lambda v, u: f(u) * f(v) * dist.pdf([u, v]), 0, np.inf, 0, np.inf,
                             epsabs=1e-12, epsrel=1e-10)
  return val


def _check_mc_nngp(layer, inputs, width, n_draws=512):
  """NNGP of a one-hidden-layer network against the mean of per-draw `f fᵀ / C`."""
  init_fn, apply_fn, kernel_fn = layer
  x1, x2 = INPUTS[inputs]()
  x = np.concatenate([x1, x2])
  nngp = kernel_fn(x, None, 'nngp')

  def draw(key):
    _, params = init_fn(key, x.shape)
    f = apply_fn(params, x)
    return f @ f.T / f.shape[-1]

  draws = jax.vmap(draw)(jax.random.split(jax.random.PRNGKey(0), n_draws))
  check_against_mc(nngp, draws, n_hidden=1, width=width, k_se=5, c_width=1.0, per_entry=False)


def test_monte_carlo_dot_general():
  """Conv, ReLU, a constant weighting of the positions (DotGeneral), readout
  (64 channels average the per-draw NNGP)."""
  _check_mc_nngp(stax.serial(
      stax.Conv(256, (2,), W_std=1.3, b_std=0.2), stax.Relu(),
      stax.DotGeneral(rhs=jnp.array([1., -1., 0.5, 0., 2., 0.3]),
                      dimension_numbers=(((1,), (0,)), ((), ()))),
      stax.Dense(64, 0.9, 0.1)), 'seq', 256)


def test_monte_carlo_index():
  _check_mc_nngp(stax.serial(
      stax.Conv(256, (2,), W_std=1.3, b_std=0.2), stax.Relu(), stax.Index(stax.Slice[:, 4:0:-2]),
      stax.Flatten(), stax.Dense(64, 0.9, 0.1)), 'seq', 256)


def test_index_of_the_batch_axis_is_a_clear_error():
  """kernelize computes both batches as one joint batch, so indexing the batch
  axis inside the network has no kernel rule yet; the finite network is NT's."""
  (init_fn, apply_fn, kernel_fn), (x1, x2) = _layer('index_batch')
  with pytest.raises(Exception, match='slice'):
    kernel_fn(x1, x2, 'nngp')
  _, params = init_fn(jax.random.PRNGKey(0), x1.shape)
  assert list(apply_fn(params, x1).shape) == _META['index_batch']['apply_shape']


@pytest.mark.slow   # ~10 s; 'nearest' covers the resize rule in the default run
def test_image_resize_linear():
  """'linear' resizing multiplies each spatial axis by a constant weight
  matrix (`dot_general` with a constant: `K ↦ M K Mᵀ` per axis). Monte Carlo
  of the finite network agrees; NT's value differs, as for 'nearest' on a
  non-square target (its covariance is resized in reversed axis order)."""
  width = 128
  layer = stax.serial(stax.Conv(width, (2, 2), b_std=0.1), stax.Relu(),
                      stax.ImageResize((-1, 6, 3, -1), 'linear'), stax.Flatten(),
                      stax.Dense(64, 0.9, 0.1))
  _check_mc_nngp(layer, 'img', width, n_draws=256)
  (init_fn, apply_fn, kernel_fn), (x1, x2) = _layer('resize_linear')
  assert _rel_err(kernel_fn(x1, x2, 'nngp'), _NT['resize_linear/nngp']) > 0.01
  _, params = init_fn(jax.random.PRNGKey(0), x1.shape)
  assert list(apply_fn(params, x1).shape) == _META['resize_linear']['apply_shape']


def test_monte_carlo_image_resize_nearest():
  _check_mc_nngp(stax.serial(
      stax.Conv(256, (2,), W_std=1.3, b_std=0.2), stax.Relu(),
      stax.ImageResize((-1, 9, -1), 'nearest'), stax.Flatten(), stax.Dense(64, 0.9, 0.1)),
      'seq', 256)


def test_image_resize_nearest_nonsquare():
  """Resizing 4x4 feature maps to 7x6: Monte Carlo of the finite network agrees
  with infwidth and tells NT's kernel apart (NT resizes its covariance in its
  internal reversed spatial order, so H gets W's new size and vice versa)."""
  width, n_draws = 128, 256
  init_fn, apply_fn, kernel_fn = stax.serial(
      stax.Conv(width, (2, 2), b_std=0.1), stax.Relu(),
      stax.ImageResize((-1, 7, 6, -1), 'nearest'), stax.Conv(64, (2, 2)), stax.GlobalAvgPool())
  x1, x2 = INPUTS['img']()
  x = np.concatenate([x1, x2])
  nngp = kernel_fn(x, None, 'nngp')

  def draw(key):
    _, params = init_fn(key, x.shape)
    f = apply_fn(params, x)
    return f @ f.T / f.shape[-1]

  draws = jax.vmap(draw)(jax.random.split(jax.random.PRNGKey(0), n_draws))
  check_against_mc(nngp, draws, n_hidden=1, width=width, k_se=5, c_width=1.0, per_entry=False)
  # The same network with NT's readout Dense(1): infwidth's kernel is off NT's.
  nt = _NT['resize_nearest_nonsquare/nngp']
  (_, _, kernel_fn), (x1, x2) = _layer('resize_nearest_nonsquare')
  assert _rel_err(kernel_fn(x1, x2, 'nngp'), nt) > 0.05


def test_rank_promotion_raise_and_scalar_bias():
  """NT's tests run with `jax_numpy_rank_promotion='raise'`; NT's apply
  functions accept a scalar bias."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2))
  init_fn, apply_fn, kernel_fn = stax.serial(
      stax.Conv(8, (3, 3), padding='SAME', b_std=0.1), stax.Relu(), stax.Flatten(),
      stax.Dense(4, b_std=0.2), stax.LayerNorm(), stax.Dense(3))
  _, params = init_fn(jax.random.PRNGKey(1), x.shape)
  want = kernel_fn(x, None, ('nngp', 'ntk'))
  with jax.numpy_rank_promotion('raise'):
    assert apply_fn(params, x).shape == (3, 3)
    got = kernel_fn(x, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  init_fn, apply_fn, _ = stax.Dense(4, b_std=0.2)
  _, (w, b) = init_fn(jax.random.PRNGKey(1), (3, 7))
  x = jnp.ones((3, 7))
  np.testing.assert_allclose(apply_fn((w, 0.), x), apply_fn((w, jnp.zeros_like(b)), x))


@pytest.mark.parametrize('layers', ['AvgPool((2, 2))', 'Flatten()', 'GlobalAvgPool()',
                                    'Identity()'])
def test_parameter_free_networks_give_nt_input_kernels(layers):
  """Without parameters the output is a fixed map of the input; NT's kernel of
  it is the channel average Σ_c f(x)_c f(x′)_c / C at every pair of positions,
  with zero NTK."""
  x1 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
  x2 = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
  init_fn, apply_fn, kernel_fn = eval(f'serial({layers})', vars(stax))  # noqa: S307
  _, params = init_fn(jax.random.PRNGKey(2), x1.shape)
  f1, f2 = np.asarray(apply_fn(params, x1)), np.asarray(apply_fn(params, x2))
  k = kernel_fn(x1, x2)
  spatial = f1.shape[1:-1]
  flat = lambda f: f.reshape(f.shape[0], -1, f.shape[-1])
  want = np.einsum('xsc,ytc->xyst', flat(f1), flat(f2)) / f1.shape[-1]
  want = want.reshape((3, 2) + spatial + spatial)
  if len(spatial) == 2:
    want = want.transpose(0, 1, 2, 4, 3, 5)  # NT's (N1, N2, H, H', W, W')
  np.testing.assert_allclose(k.nngp, want, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, 0.0)
  assert k.cov1.shape == (3,) + tuple(d for s in spatial for d in (s, s))


@pytest.mark.parametrize('axis', [(1, 2, 3), pytest.param((2, 3), marks=pytest.mark.slow)])
def test_layer_norm_over_spatial_and_channel_axes(axis):
  """The statistics over positions and channels are per-input averages of the
  per-position channel means: deterministic in the limit (Monte Carlo)."""
  width = 256
  _check_mc_nngp(stax.serial(
      stax.Conv(width, (2, 2), W_std=1.3, b_std=0.2), stax.LayerNorm(axis=axis), stax.Relu(),
      stax.GlobalAvgPool(), stax.Dense(64, 0.9, 0.1)), 'img', width, n_draws=128)


def test_layer_functions_carry_the_layer_name():
  # NT names a layer's init_fn, apply_fn and kernel_fn after the layer (NT
  # 0.6.5's names below); its tests and users' code dispatch on them. NT's
  # Relu and LeakyRelu are named 'ABRelu' (thin wrappers); here each layer
  # carries its own name.
  nt_names = {'Flatten': stax.Flatten(), 'Identity': stax.Identity(), 'Dense': stax.Dense(3),
              'GlobalAvgPool': stax.GlobalAvgPool(), 'Sin': stax.Sin(), 'Rbf': stax.Rbf(),
              'serial': stax.serial(stax.Dense(3), stax.Relu()),
              'repeat': stax.repeat(stax.Dense(3), 2), 'Relu': stax.Relu()}
  for name, layer in nt_names.items():
    assert [f.__name__ for f in layer] == [name] * 3
  # Naming one layer leaves the others (and shared functions) alone.
  assert stax.Dense(3)[2].__name__ == 'Dense' and stax.Relu()[2].__name__ == 'Relu'


@pytest.mark.parametrize('same_inputs', [True, False])
def test_an_output_that_is_exactly_zero_has_a_zero_kernel(same_inputs):
  # ABRelu(0, 0) maps everything to 0: NT's kernels are zero (the kernel of
  # `0 * Identity`), a degenerate Gaussian.
  x1 = jax.random.normal(jax.random.PRNGKey(1), (3, 2))
  x2 = None if same_inputs else jax.random.normal(jax.random.PRNGKey(2), (4, 2))
  n2 = 3 if same_inputs else 4
  k = stax.serial(stax.Dense(5, 1., 0.), stax.ABRelu(0, 0))[2](x1, x2)
  np.testing.assert_array_equal(k.nngp, np.zeros((3, n2)))
  np.testing.assert_array_equal(k.ntk, np.zeros((3, n2)))
  np.testing.assert_array_equal(k.cov1, np.zeros(3))
  assert k.cov2 is None if same_inputs else np.all(k.cov2 == 0)
  assert k.is_gaussian and k.shape1 == (3, 5) and k.shape2 == (n2, 5)
  # With spatial axes, and followed by a readout (a zero input to a Dense
  # leaves only its bias: NNGP and NTK b_std²).
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 3))
  conv = stax.serial(stax.Conv(3, (2, 2), padding='SAME'), stax.ABRelu(0, 0))
  assert conv[2](x, None, 'nngp').shape == (2, 2, 4, 4, 4, 4)
  net = stax.serial(conv, stax.Flatten(), stax.Dense(2, 1.5, 0.3))
  np.testing.assert_allclose(net[2](x, None, 'nngp'), np.full((2, 2), 0.09), rtol=1e-12)
  np.testing.assert_allclose(net[2](x, None, 'ntk'), np.full((2, 2), 0.09), rtol=1e-12)


def test_unmask_fn_passes_plain_outputs_through():
  # NT's `unmask_fn(apply_fn)`: outputs as arrays, `mask_constant` accepted.
  # Nothing is masked here, so it is apply_fn; a mask constant is refused.
  init_fn, apply_fn, _ = stax.serial(stax.Dense(4), stax.Relu())
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
  _, params = init_fn(jax.random.PRNGKey(1), x.shape)
  f = stax.unmask_fn(apply_fn)
  np.testing.assert_array_equal(f(params, x), apply_fn(params, x))
  np.testing.assert_array_equal(f(params, x, mask_constant=None), apply_fn(params, x))
  with pytest.raises(Exception, match='masking'):
    f(params, x, mask_constant=10.)
