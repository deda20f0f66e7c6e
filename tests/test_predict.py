"""Tests of `infwidth.predict`: self-consistency, NT 0.6.5 values, errors."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from jax.experimental import checkify

from infwidth import predict

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures',
                        'predict_nt.npz')
N, M = 8, 5  # Train and test sizes of the fixtures.
TR, TE = slice(0, N), slice(N, N + M)
Kern = collections.namedtuple('Kern', ('nngp', 'ntk'), defaults=(None, None))


@pytest.fixture(scope='module')
def nt():
  return dict(np.load(FIXTURES))


def assert_rel(actual, expected, rtol):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)),
                                                1e-300)
  assert err <= rtol, f'relative error {err:.3e} > {rtol:.1e}'


@jax.jit
def _relu_kernels(x1, x2):
  """One-hidden-layer ReLU network: arc-cosine NNGP and NTK, bias var 0.1."""
  d = x1.shape[-1]
  k12 = x1 @ x2.T / d
  n1 = jnp.sqrt(jnp.sum(x1 ** 2, -1) / d)[:, None]
  n2 = jnp.sqrt(jnp.sum(x2 ** 2, -1) / d)[None, :]
  cos = jnp.clip(k12 / (n1 * n2), -1., 1.)
  theta = jnp.arccos(cos)
  t = n1 * n2 / (2 * np.pi) * (jnp.sin(theta) + (np.pi - theta) * cos)
  t_dot = (np.pi - theta) / (2 * np.pi)
  return t + 0.1, t + t_dot * k12 + 0.1


def relu_kernel_fn(x1, x2=None, get=('nngp', 'ntk')):
  """NT-style `kernel_fn(x1, x2, get)` of `_relu_kernels`."""
  nngp, ntk = _relu_kernels(x1, x1 if x2 is None else x2)
  ks = {'nngp': nngp, 'ntk': ntk}
  if isinstance(get, str):
    return ks[get]
  return Kern(**{g: ks[g] for g in get})


def data(n=40, m=7, d=5, c=2, seed=0, dtype=np.float64):
  rng = np.random.RandomState(seed)
  x = rng.randn(n + m, d).astype(dtype)
  y = rng.randn(n, c).astype(dtype)
  return x[:n], x[n:], y


# ------------------------------------------------------------------------
# Against Neural Tangents 0.6.5.

MSE_CASES = [('mse', {}), ('mse_reg', dict(learning_rate=0.7, diag_reg=1e-2)),
             ('mse_abs', dict(diag_reg=0.1, diag_reg_absolute_scale=True))]


@pytest.mark.parametrize('name,kw', MSE_CASES)
def test_gradient_descent_mse_matches_nt(nt, name, kw):
  ntk = nt['ntk']
  fn = predict.gradient_descent_mse(ntk[TR, TR], nt['y'], **kw)
  for suffix, t in (('t', nt['t']), ('inf', None)):
    a, b = fn(t, nt['fx_train_0'], nt['fx_test_0'], ntk[TE, TR])
    assert_rel(a, nt[f'{name}_train_{suffix}'], 1e-8)
    assert_rel(b, nt[f'{name}_test_{suffix}'], 1e-8)
  assert_rel(fn(2., None, nt['fx_test_0'], ntk[TE, TR]),
             nt[f'{name}_test_only_t'], 1e-8)


def test_gradient_descent_mse_output_axes_match_nt(nt):
  k4 = nt['k4']  # (N, N, 3, 3) for y of shape (N, 3, 2), trace_axes=(-1,).
  fn = predict.gradient_descent_mse(k4[TR, TR], nt['y4'], learning_rate=0.5,
                                    diag_reg=1e-3)
  for suffix, t in (('t', nt['t']), ('inf', None)):
    a, b = fn(t, nt['fx4_train_0'], nt['fx4_test_0'], k4[TE, TR])
    assert_rel(a, nt[f'mse4_train_{suffix}'], 1e-8)
    assert_rel(b, nt[f'mse4_test_{suffix}'], 1e-8)


def _mse(fx, y):
  return 0.5 * jnp.mean((fx - y) ** 2)


def _xent(fx, y):
  return -jnp.mean(jax.nn.log_softmax(fx) * jax.nn.softmax(y))


@pytest.mark.parametrize('name,loss,kw', [
    ('gd_mse', _mse, dict(learning_rate=0.7)),
    ('gd_mom', _mse, dict(learning_rate=0.5, momentum=0.9)),
    ('gd_xent', _xent, dict(learning_rate=2., momentum=0.5))])
def test_gradient_descent_matches_nt(nt, name, loss, kw):
  # NT integrates with jax.experimental.ode at rtol = atol = 1.4e-8; its
  # outputs are only that accurate (1.1e-8 from the closed form, checked
  # below), so we integrate tightly and allow 3e-8.
  ntk = nt['ntk']
  fn = predict.gradient_descent(loss, ntk[TR, TR], nt['y'], rtol=1e-12,
                                atol=1e-12, **kw)
  a, b = fn(nt['t_ode'], nt['fx_train_0'], nt['fx_test_0'], ntk[TE, TR])
  assert_rel(a, nt[f'{name}_train_t'], 3e-8)
  assert_rel(b, nt[f'{name}_test_t'], 3e-8)
  if name == 'gd_mse':
    exact = predict.gradient_descent_mse(ntk[TR, TR], nt['y'], 0.7)(
        nt['t_ode'], nt['fx_train_0'], nt['fx_test_0'], ntk[TE, TR])
    assert_rel(a, exact[0], 1e-10)
    assert_rel(nt[f'{name}_train_t'], exact[0], 3e-8)


@pytest.mark.parametrize('name,reg', [('gp', 0.), ('gp_reg', 1e-2)])
@pytest.mark.parametrize('solver', ['cholesky', 'cg'])
def test_gp_inference_matches_nt(nt, name, reg, solver):
  nngp, ntk = nt['nngp'], nt['ntk']
  k_dd = Kern(nngp[TR, TR], ntk[TR, TR])
  k_td = Kern(nngp[TE, TR], ntk[TE, TR])
  k_tt = Kern(nngp[TE, TE], ntk[TE, TE])
  fn = predict.gp_inference(k_dd, nt['y'], diag_reg=reg, solver=solver,
                            tol=1e-13)
  res = fn(('nngp', 'ntk', 'ntkgp'), k_td, k_tt)
  for g in ('nngp', 'ntk', 'ntkgp'):
    assert isinstance(getattr(res, g), predict.Gaussian)
    assert_rel(getattr(res, g).mean, nt[f'{name}_{g}_mean'], 1e-8)
    assert_rel(getattr(res, g).covariance, nt[f'{name}_{g}_cov'], 1e-8)
  # A single string gives the value itself, `None` both nngp and ntk.
  assert_rel(fn('ntk', k_td), nt[f'{name}_ntk_mean'], 1e-8)
  both = fn(None, k_td)
  assert both._fields == ('nngp', 'ntk')


def test_gp_inference_accepts_kernel_objects(nt):
  from infwidth import Kernel
  nngp, ntk = nt['nngp'], nt['ntk']
  k = lambda s1, s2: Kernel(nngp=nngp[s1, s2], ntk=ntk[s1, s2], cov1=None,
                            cov2=None)
  res = predict.gp_inference(k(TR, TR), nt['y'])('ntk', k(TE, TR), k(TE, TE))
  assert_rel(res.mean, nt['gp_ntk_mean'], 1e-8)
  assert_rel(res.covariance, nt['gp_ntk_cov'], 1e-8)
  assert predict.solvers.choose_solver('auto', N, np.float64) == 'cholesky'


def test_gp_inference_output_axes_match_nt(nt):
  k4 = nt['k4']
  fn = predict.gp_inference(Kern(nngp=k4[TR, TR]), nt['y4'], diag_reg=1e-3)
  res = fn('nngp', Kern(nngp=k4[TE, TR]), Kern(nngp=k4[TE, TE]))
  assert_rel(res.mean, nt['gp4_mean'], 1e-8)
  assert_rel(res.covariance, nt['gp4_cov'], 1e-8)


def _lookup_kernel_fn(nt):
  def kernel_fn(x1, x2, get):
    x2 = x1 if x2 is None else x2
    ks = {g: jnp.asarray(nt[g][np.ix_(x1, x2)]) for g in ('nngp', 'ntk')}
    return ks[get] if isinstance(get, str) else Kern(**{g: ks[g] for g in get})
  return kernel_fn


def test_ensemble_matches_nt(nt):
  fn = predict.gradient_descent_mse_ensemble(
      _lookup_kernel_fn(nt), np.arange(N), nt['y'], learning_rate=0.8,
      diag_reg=1e-3)
  for suffix, t in (('t', nt['t']), ('inf', None)):
    for xs, x_test in (('test', np.arange(N, N + M)), ('train', None)):
      res = fn(t, x_test, ('nngp', 'ntk'), compute_cov=True)
      for g in ('nngp', 'ntk'):
        assert_rel(getattr(res, g).mean, nt[f'ens_{xs}_{suffix}_{g}_mean'],
                   1e-8)
        assert_rel(getattr(res, g).covariance,
                   nt[f'ens_{xs}_{suffix}_{g}_cov'], 1e-8)
  mean = fn(nt['t'], np.arange(N, N + M), 'ntk')
  assert_rel(mean, nt['ens_test_t_ntk_mean'], 1e-8)


def test_max_learning_rate_matches_nt(nt):
  ntk = nt['ntk'][TR, TR]
  assert_rel(predict.max_learning_rate(ntk), nt['max_lr'], 1e-8)
  assert_rel(predict.max_learning_rate(ntk, y_train_size=24, momentum=0.9),
             nt['max_lr_mom'], 1e-8)


# ------------------------------------------------------------------------
# Self-consistency.


def test_infinite_time_is_gp_inference():
  x, xt, y = data()
  k_dd, k_td = relu_kernel_fn(x, None), relu_kernel_fn(xt, x)
  mse = predict.gradient_descent_mse(k_dd.ntk, y, diag_reg=1e-4)
  gp = predict.gp_inference(k_dd, y, diag_reg=1e-4)
  zero = jnp.zeros((xt.shape[0], y.shape[1]))
  assert_rel(mse(None, None, zero, k_td.ntk), gp('ntk', k_td), 1e-12)
  # The eigenbasis path at a huge time converges to the same.
  assert_rel(mse(1e14, None, zero, k_td.ntk), gp('ntk', k_td), 1e-6)
  assert_rel(mse(np.inf, None, zero, k_td.ntk), gp('ntk', k_td), 1e-6)
  # With the NNGP the training set is fit exactly.
  assert_rel(mse(None, jnp.zeros_like(y), zero, k_td.ntk)[0], y, 0)


def test_time_zero_returns_initial_outputs():
  x, xt, y = data()
  k_dd, k_td = relu_kernel_fn(x, None), relu_kernel_fn(xt, x)
  rng = np.random.RandomState(1)
  f0, f0t = rng.randn(*y.shape), rng.randn(xt.shape[0], y.shape[1])
  a, b = predict.gradient_descent_mse(k_dd.ntk, y)(0., f0, f0t, k_td.ntk)
  assert_rel(a, f0, 1e-15)
  assert_rel(b, f0t, 1e-15)
  ens = predict.gradient_descent_mse_ensemble(relu_kernel_fn, x, y)
  res = ens(0., xt, 'ntk', compute_cov=True)
  assert_rel(res.mean, np.zeros_like(f0t), 0)
  assert_rel(res.covariance, relu_kernel_fn(xt, None, 'nngp'), 1e-12)


def test_gradient_descent_mse_loss_equals_closed_form():
  x, xt, y = data(n=20)
  k_dd, k_td = relu_kernel_fn(x, None, 'ntk'), relu_kernel_fn(xt, x, 'ntk')
  rng = np.random.RandomState(2)
  f0, f0t = rng.randn(*y.shape), rng.randn(xt.shape[0], y.shape[1])
  ts = np.array([[0.5, 3.], [10., 50.]])
  exact = predict.gradient_descent_mse(k_dd, y, 0.3)(ts, f0, f0t, k_td)
  ode = predict.gradient_descent(_mse, k_dd, y, 0.3, rtol=1e-10,
                                 atol=1e-10)(ts, f0, f0t, k_td)
  assert ode[0].shape == exact[0].shape == (2, 2) + y.shape
  assert_rel(ode[0], exact[0], 1e-8)
  assert_rel(ode[1], exact[1], 1e-8)
  # ODEState in, ODEState out; jittable.
  state = jax.jit(predict.gradient_descent(_mse, k_dd, y, 0.3))(
      ts, predict.ODEState(f0, f0t), None, k_td)
  assert isinstance(state, predict.ODEState)
  assert_rel(state.fx_test, exact[1], 1e-6)


def test_momentum_with_small_mass_approaches_gradient_descent():
  # In steps, heavy ball is f'' + (1 - μ) f' = -η Θ ∇L: for η λ_max ≪ 1 the
  # inertia is negligible on the time scale 1/(η λ) of training.
  x, _, y = data(n=12)
  k = relu_kernel_fn(x, None, 'ntk')
  lam = float(np.linalg.eigvalsh(k)[-1]) / y.size
  errs = []
  for lr in (0.05 / lam, 0.005 / lam):
    t = np.array([1., 3.]) / (lr * lam)
    gd = predict.gradient_descent_mse(k, y, lr)(t, 0.)
    mom = predict.gradient_descent(_mse, k, y, lr, momentum=0.)(t, 0.)
    errs.append(float(np.max(np.abs(mom - gd)) / np.max(np.abs(gd))))
  assert errs[0] < 0.1
  assert errs[1] < errs[0] / 5


def test_cg_equals_cholesky():
  x, xt, y = data(n=120, m=9)
  k_dd, k_td = relu_kernel_fn(x, None), relu_kernel_fn(xt, x)
  k_tt = relu_kernel_fn(xt, None)
  kw = dict(diag_reg=1e-3)
  ref = predict.gp_inference(k_dd, y, solver='cholesky', **kw)(
      None, k_td, k_tt)
  cg = predict.gp_inference(k_dd, y, solver='cg', tol=1e-11, **kw)(
      None, k_td, k_tt)
  for g in ('nngp', 'ntk'):
    assert_rel(getattr(cg, g).mean, getattr(ref, g).mean, 1e-8)
    assert_rel(getattr(cg, g).covariance, getattr(ref, g).covariance, 1e-8)
  jacobi = predict.gp_inference(k_dd, y, solver='cg', tol=1e-11,
                                preconditioner='jacobi', **kw)('nngp', k_td)
  assert_rel(jacobi, ref.nngp.mean, 1e-8)
  # Matrix-free, blocks not dividing N: never forms the N x N kernel.
  ops_dd = predict.kernel_operator(relu_kernel_fn, x, None, 'nngp',
                                   block_size=50)
  ops_td = predict.kernel_operator(relu_kernel_fn, xt, x, 'nngp',
                                   block_size=4)
  mean = predict.gp_inference(ops_dd, y, solver='cg', tol=1e-11, **kw)(
      'nngp', ops_td)
  assert_rel(mean, ref.nngp.mean, 1e-8)
  # At t=None also for the MSE predictor and the ensemble.
  zero = jnp.zeros((xt.shape[0], y.shape[1]))
  a = predict.gradient_descent_mse(k_dd.ntk, y, solver='cg', tol=1e-11,
                                   **kw)(None, None, zero, k_td.ntk)
  assert_rel(a, ref.ntk.mean, 1e-8)
  ens = predict.gradient_descent_mse_ensemble(relu_kernel_fn, x, y,
                                              solver='cg', tol=1e-11, **kw)
  assert_rel(ens(None, xt, 'ntk'), ref.ntk.mean, 1e-8)


def test_ensemble_finite_time_matches_lee_et_al():
  # Lee et al. 2019, §2.3, Eq. 15-16, with NT's time convention η t / n.
  x, xt, y = data(n=15, m=4, c=2)
  lr, t, n = 0.6, 7., y.size
  kdd, ktd, ktt = (relu_kernel_fn(x, None), relu_kernel_fn(xt, x),
                   relu_kernel_fn(xt, None, 'nngp'))
  k, th = np.asarray(kdd.nngp), np.asarray(kdd.ntk)
  eye = np.eye(len(x))
  a_ntk = np.linalg.solve(th, eye - scipy.linalg.expm(-lr * t / n * th))
  mean = np.asarray(ktd.ntk) @ a_ntk @ y
  cov = (ktt + ktd.ntk @ a_ntk @ k @ a_ntk.T @ ktd.ntk.T
         - (ktd.ntk @ a_ntk @ ktd.nngp.T + ktd.nngp @ a_ntk.T @ ktd.ntk.T))
  a2 = np.linalg.solve(k, eye - scipy.linalg.expm(-2 * lr * t / n * k))
  a_nngp = np.linalg.solve(k, eye - scipy.linalg.expm(-lr * t / n * k))
  fn = predict.gradient_descent_mse_ensemble(relu_kernel_fn, x, y, lr)
  res = fn(t, xt, None, compute_cov=True)
  assert_rel(res.ntk.mean, mean, 1e-9)
  assert_rel(res.ntk.covariance, cov, 1e-9)
  assert_rel(res.nngp.mean, np.asarray(ktd.nngp) @ a_nngp @ y, 1e-9)
  assert_rel(res.nngp.covariance, ktt - ktd.nngp @ a2 @ ktd.nngp.T, 1e-9)
  # Times of any shape lead the outputs.
  res = fn(np.array([[1., t]]), xt, 'ntk', compute_cov=True)
  assert res.mean.shape == (1, 2) + (len(xt), 2)
  assert_rel(res.covariance[0, 1], cov, 1e-9)


def test_marginal_log_likelihood_matches_scipy():
  x, _, y = data(n=30, c=3)
  k = relu_kernel_fn(x, None)
  mll = predict.marginal_log_likelihood(k, y, diag_reg=1e-2)
  for g in ('nngp', 'ntk'):
    kk = np.asarray(getattr(k, g))
    kk = kk + 1e-2 * np.mean(np.diag(kk)) * np.eye(len(kk))
    ref = sum(scipy.stats.multivariate_normal.logpdf(y[:, c], cov=kk)
              for c in range(y.shape[1]))
    assert_rel(getattr(mll, g), ref, 1e-10)
    # CG + stochastic Lanczos quadrature: an estimate.
    est = predict.marginal_log_likelihood(k, y, 1e-2, get=g, solver='cg',
                                          logdet_probes=64)
    assert abs(float(est) - ref) < 0.02 * abs(ref)
  assert float(predict.marginal_log_likelihood(k.nngp, y, 1e-2)) == \
      pytest.approx(float(mll.nngp), rel=1e-12)


def test_float32_and_jit():
  x, xt, y = data(dtype=np.float32)
  k_dd, k_td = relu_kernel_fn(x, None), relu_kernel_fn(xt, x)
  assert k_dd.nngp.dtype == jnp.float32
  for solver in ('cholesky', 'cg'):
    fn = predict.gp_inference(k_dd, y, diag_reg=1e-3, solver=solver, tol=1e-5)
    mean = fn('nngp', k_td)
    assert mean.dtype == jnp.float32
    ref = predict.gp_inference(jax.tree_util.tree_map(
        lambda a: a.astype(np.float64), k_dd), y.astype(np.float64),
        diag_reg=1e-3)('nngp', k_td.nngp.astype(np.float64))
    assert_rel(mean, ref, 1e-3)
  fn = predict.gradient_descent_mse(k_dd.ntk, y)
  jitted = jax.jit(lambda t, k: fn(t, None, jnp.zeros((7, 2), np.float32), k))
  out = jitted(jnp.float32(3.), k_td.ntk)
  assert out.dtype == jnp.float32
  assert_rel(out, fn(3., None, jnp.zeros((7, 2), np.float32), k_td.ntk), 1e-5)
  # The whole construction also traces.
  full = jax.jit(lambda k, y, ktd: predict.gp_inference(k, y, 1e-3)(
      'nngp', ktd))
  assert_rel(full(k_dd.nngp, y, k_td.nngp), ref, 1e-3)


# ------------------------------------------------------------------------
# Bad input.


def test_not_positive_definite_raises():
  x, xt, y = data(n=10)
  k = np.asarray(relu_kernel_fn(x, None, 'nngp'))
  bad = k - 2 * np.linalg.eigvalsh(k)[-1] * np.eye(10)
  fn = predict.gp_inference(bad, y, solver='cholesky')
  with pytest.raises(predict.NotPositiveDefiniteError,
                     match='not positive definite.*diag_reg'):
    fn('nngp', relu_kernel_fn(xt, x, 'nngp'))
  with pytest.raises(predict.NotPositiveDefiniteError, match='diag_reg'):
    predict.marginal_log_likelihood(bad, y, solver='cholesky')
  with pytest.raises(ValueError, match='diag_reg'):
    predict.gp_inference(bad, y, solver='cg')('nngp',
                                              relu_kernel_fn(xt, x, 'nngp'))


def test_shape_mismatch_names_both_shapes():
  x, xt, y = data(n=10)
  k = relu_kernel_fn(x, None, 'ntk')
  with pytest.raises(ValueError, match=r'\(10, 10\).*\(9, 2\)'):
    predict.gradient_descent_mse(k, y[:9])
  with pytest.raises(ValueError, match=r'\(10, 10\).*\(9, 2\)'):
    predict.gp_inference(k, y[:9])
  with pytest.raises(ValueError, match=r'\(7, 9\).*\(10, 10\)'):
    predict.gp_inference(k, y)('ntk', relu_kernel_fn(xt, x[:9], 'ntk'))


def test_nan_inputs_and_results_raise():
  x, xt, y = data(n=10)
  k, ktd = relu_kernel_fn(x, None, 'ntk'), relu_kernel_fn(xt, x, 'ntk')
  with pytest.raises(predict.NonFiniteError, match='`y_train` contains NaN'):
    predict.gp_inference(k, y.at[0, 0].set(np.nan) if hasattr(y, 'at') else
                         np.where(np.arange(y.size).reshape(y.shape) == 0,
                                  np.nan, y))
  fn = predict.gradient_descent_mse(k, y)
  with pytest.raises(predict.NonFiniteError, match='`k_test_train` contains'):
    fn(1., None, np.zeros((7, 2)), ktd.at[0, 0].set(np.nan))
  # A singular kernel without regularisation: NaN result, named as such.
  singular = jnp.ones((10, 10))
  with pytest.raises((predict.NotPositiveDefiniteError,
                      predict.NonFiniteError)):
    predict.gp_inference(singular, y, solver='cholesky')('ntk', ktd)
  with pytest.raises(ValueError, match='finite times'):
    predict.gradient_descent(_mse, k, y)(None, 0.)


def test_checks_under_jit():
  x, xt, y = data(n=10)
  k, ktd = relu_kernel_fn(x, None, 'ntk'), relu_kernel_fn(xt, x, 'ntk')
  f = lambda kk, kt: predict.gp_inference(kk, y)('ntk', kt)
  # Plain jit: NaN propagates silently.
  out = jax.jit(f)(k, ktd.at[0, 0].set(np.nan))
  assert np.isnan(np.asarray(out)).any()
  checked = predict.checked(f)
  assert_rel(checked(k, ktd), f(k, ktd), 1e-12)
  with pytest.raises(checkify.JaxRuntimeError, match='k_test_train'):
    checked(k, ktd.at[0, 0].set(np.nan))
  bad = k - 2 * jnp.linalg.eigvalsh(k)[-1] * jnp.eye(10)
  with pytest.raises(checkify.JaxRuntimeError, match='not positive definite'):
    checked(bad, ktd)


def test_ntk_test_covariance_needs_both_kernels(nt):
  """The NTK posterior covariance uses the NNGP train-train and test-train
  matrices: bare NTK arrays cannot provide them (NT refuses too)."""
  ntk = nt['ntk']
  fn = predict.gp_inference(ntk[TR, TR], nt['y'])
  assert_rel(fn('ntk', ntk[TE, TR]), nt['gp_ntk_mean'], 1e-8)  # the mean needs the NTK only
  with pytest.raises(ValueError, match='both NTK and NNGP'):
    fn('ntk', ntk[TE, TR], ntk[TE, TE])


def test_predictions_work_with_rank_promotion_raise():
  """NT's tests run with `jax_numpy_rank_promotion='raise'`: the predictors
  broadcast internally and must give the same values under it."""
  import infwidth as iw
  from infwidth import stax
  _, _, kf = stax.serial(stax.Dense(64), stax.Relu(), stax.Dense(1))
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  xt = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
  y = jnp.sin(x[:, :1])

  def run():
    ens = iw.predict.gradient_descent_mse_ensemble(kf, x, y, diag_reg=1e-4)
    mse = iw.predict.gradient_descent_mse(kf(x, None, 'ntk'), y, diag_reg=1e-4)
    gp = iw.predict.gp_inference(kf(x, None), y, diag_reg=1e-4)
    return (ens(1.0, xt, 'ntk', compute_cov=True).covariance,
            mse(jnp.array([0.5, 2.0]), jnp.zeros_like(y))[..., 0],
            gp('nngp', kf(xt, x), None)[:, 0])

  want = run()
  with jax.numpy_rank_promotion('raise'):
    got = run()
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
