"""Gaussian-process inference with NNGP / NTK kernels.

`gp_inference` is the exact posterior (NNGP: Bayesian infinite network; NTK:
infinite ensemble trained to convergence; NTKGP: GP with the NTK prior).
`gradient_descent_mse_ensemble` also gives the finite-time distribution of an
infinite ensemble (Lee et al. 2019, §2.3), and `marginal_log_likelihood` the
evidence used for model selection (NT paper, Fig. 3).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.predict import _axes
from infwidth.predict import checks
from infwidth.predict import dynamics
from infwidth.predict import solvers


class Gaussian(NamedTuple):
  """A `(mean, covariance)` pair (NT's `Gaussian`).

  Attributes:
    mean: shape of the function outputs.
    covariance: shape of the respective NNGP/NTK kernel.
  """
  mean: jax.Array
  covariance: jax.Array


_HINT = ('`k_train_train` may be too ill-conditioned; pass `diag_reg > 0` or '
         'use float64.')


def _dense(k: Any) -> jax.Array:
  return k.materialize() if solvers.is_operator(k) else k


def _solver_cache(k_train_train, diag_reg, diag_reg_absolute_scale, solver,
                  tol, maxiter, **kwargs) -> Callable[[str], Any]:
  @checks.memoize_concrete
  def get(g: str) -> solvers.Solver:
    k = _axes.get_attr(k_train_train, g)
    k = k if solvers.is_operator(k) else _axes.make_2d(k)
    return solvers.make_solver(k, diag_reg, diag_reg_absolute_scale, solver,
                               tol, maxiter, name=f'k_train_train ({g})',
                               **kwargs)
  return get


def _validate(k_train_train: Any, y_train: jax.Array,
              trace_axes: Tuple[int, ...], gets: Tuple[str, ...]) -> None:
  for g in gets:
    if _axes.has_attr(k_train_train, g):
      k = _axes.get_attr(k_train_train, g)
      _axes.check_kernel_targets(k, y_train, trace_axes,
                                 f'k_train_train.{g}' if not
                                 _axes.is_array(k_train_train) else
                                 'k_train_train')
      if not solvers.is_operator(k):
        checks.check_finite(k, f'`k_train_train` ({g})')
  checks.check_finite(y_train, '`y_train`')


def _holds_nngp(k: Any) -> bool:
  """`k` is a namedtuple, `Kernel` or dict holding an `nngp` (beside the
  `ntk`), not a bare array of one kernel."""
  if _axes.is_array(k) or hasattr(k, 'matvec'):
    return False
  return _axes.has_attr(k, 'nngp')


def gp_inference(
    k_train_train: Any,
    y_train: jax.Array,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: _axes.Axes = (-1,),
    solver: str = 'auto',
    tol: float = 1e-10,
    maxiter: Optional[int] = None,
    preconditioner: str = 'nystrom',
) -> Callable[..., Any]:
  """Posterior of the NNGP / NTK / NTKGP Gaussian process on a test set.

  NNGP: `μ = K_tx K⁻¹ y`, `Σ = K_tt - K_tx K⁻¹ K_xt`. NTK (infinite time of
  an infinite ensemble, Lee et al. 2019 Eq. 16 at `t = ∞`):
  `μ = Θ_tx Θ⁻¹ y`, `Σ = K_tt + Θ_tx Θ⁻¹ K Θ⁻¹ Θ_xt - (Θ_tx Θ⁻¹ K_xt + h.c.)`.

  Solves use `solver`: `'cholesky'`, `'cg'` (matrix-free conjugate
  gradients; kernels may be `KernelOperator`s from `kernel_operator`, for
  the mean at any `N`) or `'auto'`. Eagerly, a kernel Cholesky cannot
  factorise raises `NotPositiveDefiniteError`, NaN inputs or results raise
  `NonFiniteError`; under `jit` use `checked`.

  Args:
    k_train_train: `(N, N, ...)` array, namedtuple or `Kernel` with the
      `nngp` and/or `ntk` fields needed later (`ntk` covariance needs both).
    y_train: `(N, ..., C)` targets.
    diag_reg: added to the kernel's diagonal, times the mean of the diagonal
      unless `diag_reg_absolute_scale`.
    diag_reg_absolute_scale: `diag_reg` is in absolute units.
    trace_axes: axes of `y_train` along which kernels are `K ⊗ I`.
    solver: `'cholesky'`, `'cg'` or `'auto'` (see `solvers.choose_solver`).
    tol, maxiter: conjugate-gradient relative tolerance and iteration cap.
    preconditioner: CG preconditioner, `'nystrom'` or `'jacobi'`.

  Returns:
    `predict_fn(get=None, k_test_train=None, k_test_test=None)` returning,
    per `get` (`'nngp'`, `'ntk'`, `'ntkgp'`, a tuple, or `None` for both
    `nngp` and `ntk`), the mean `(M, ..., C)`, or a `Gaussian` with the
    covariance `(M, M, ...)` when `k_test_test` is given.
  """
  y_train = jnp.asarray(y_train)
  trace_axes = _axes.canonicalize_axis(trace_axes, y_train.ndim)
  _validate(k_train_train, y_train, trace_axes, ('nngp', 'ntk'))
  even, odd, first, last = _axes.get_axes(_axes.get_first(k_train_train).ndim)
  train_shape = tuple(_axes.get_first(k_train_train).shape[1::2])
  solve = _solver_cache(k_train_train, diag_reg, diag_reg_absolute_scale,
                        solver, tol, maxiter, preconditioner=preconditioner)

  @checks.memoize_concrete
  def k_inv_y(g: str) -> jax.Array:
    return dynamics.solve_along(solve(g), train_shape, y_train, trace_axes)

  def cov_solve(g: str, b: jax.Array) -> jax.Array:
    return dynamics.solve_along(solve(g), train_shape, b, even)

  def one(g: str, k_test_train: Any, k_test_test: Any) -> Any:
    k = 'ntk' if g == 'ntkgp' else g
    if k not in ('nngp', 'ntk'):
      raise ValueError(f'Unknown `get` entry {g!r}; use "nngp", "ntk" or '
                       '"ntkgp".')
    k_dd = _axes.get_attr(k_train_train, k)
    k_td = None if k_test_train is None else _axes.get_attr(k_test_train, k)
    if k_td is None:
      y = y_train.astype(k_dd.dtype)
    elif solvers.is_operator(k_td):
      alpha = k_inv_y(k)
      y = k_td.matvec(alpha.reshape((alpha.shape[0], -1)))
      y = y.reshape((k_td.shape[0],) + alpha.shape[1:])
      y = jnp.moveaxis(y, range(-len(trace_axes), 0), trace_axes)
    else:
      y = jnp.tensordot(k_td, k_inv_y(k), (odd, first))
      y = jnp.moveaxis(y, range(-len(trace_axes), 0), trace_axes)
    if k_test_test is None:
      return y
    if k_td is None:
      return Gaussian(y, jnp.zeros(_dense(k_dd).shape, k_dd.dtype))
    # The NTK posterior covariance needs the NNGP train-train and test-train
    # matrices as well: a bare array holds one kernel only, so it cannot be
    # read as both (as NT refuses it too).
    if g == 'ntk' and not (_holds_nngp(k_train_train) and _holds_nngp(k_test_train)):
      raise ValueError(
          'If `"ntk" in get`, and `k_test_test is not None`, and '
          '`k_test_train is not None`, i.e. you request the NTK posterior '
          'covariance on the test set, you need both NTK and NNGP train-train '
          'and test-train matrices contained in `k_test_train` and '
          '`k_train_train`. Hence they must be `namedtuple`s with `nngp` and '
          '`ntk` attributes.')
    g_init = 'ntk' if g == 'ntkgp' else 'nngp'  # Kernel at initialisation.
    k_td = _dense(k_td)
    k_td_init = _dense(_axes.get_attr(k_test_train, g_init))
    k_tt = _dense(_axes.get_attr(k_test_test, g_init))
    k_td_g_inv_y = cov_solve(k, k_td_init)
    if g in ('nngp', 'ntkgp'):
      cov = jnp.tensordot(k_td, k_td_g_inv_y, (odd, first))
      return Gaussian(y, k_tt - _axes.zip_axes(cov))
    term_1 = cov_solve(g, k_td)  # Θ⁻¹ Θ_xt
    cov = jnp.tensordot(_dense(_axes.get_attr(k_train_train, 'nngp')),
                        term_1, (odd, first))
    cov = jnp.tensordot(term_1, cov, (first, first))  # Θ_tx Θ⁻¹ K Θ⁻¹ Θ_xt
    term_2 = jnp.tensordot(k_td, k_td_g_inv_y, (odd, first))
    term_2 = term_2 + jnp.moveaxis(term_2, first, last)
    return Gaussian(y, _axes.zip_axes(cov - term_2) + k_tt)

  def predict_fn(get: _axes.Get = None, k_test_train: Any = None,
                 k_test_test: Any = None) -> Any:
    """Posterior on the test set (train set if `k_test_train is None`).

    Args:
      get: `'nngp'`, `'ntk'`, `'ntkgp'`, a tuple of them, or `None` for
        `('nngp', 'ntk')`.
      k_test_train: `(M, N, ...)` array / namedtuple / `Kernel` /
        `KernelOperator` (mean only), or `None` for the training set
        (`N(y_train, 0)`).
      k_test_test: `(M, M, ...)` test-test kernel, for the covariance
        (`True` with `k_test_train=None` for the zero train covariance).

    Returns:
      The mean, or a `Gaussian`, for a string `get`; a namedtuple of them
      (`Gaussians`) otherwise.
    """
    single, gets = _axes.canonicalize_get(get)
    gets = ('nngp', 'ntk') if gets is None else gets
    if k_test_train is not None:
      for g in gets:
        kk = 'ntk' if g == 'ntkgp' else g
        if _axes.has_attr(k_test_train, kk):
          k_td = _axes.get_attr(k_test_train, kk)
          _axes.check_test_kernel(k_td, _axes.get_attr(k_train_train, kk))
          if not solvers.is_operator(k_td):
            checks.check_finite(k_td, f'`k_test_train` ({kk})')
    if k_test_test is not None and k_test_test is not True:
      for g in ('nngp', 'ntk'):
        if (_axes.has_attr(k_test_test, g) and
            not solvers.is_operator(_axes.get_attr(k_test_test, g))):
          checks.check_finite(_axes.get_attr(k_test_test, g),
                              f'`k_test_test` ({g})')
    out = {g: one(g, k_test_train, k_test_test) for g in gets}
    dynamics.check_result(out, _HINT)
    return _axes.named_output('Gaussians', out, single, gets)

  return predict_fn


def marginal_log_likelihood(
    k_train_train: Any,
    y_train: jax.Array,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: _axes.Axes = (-1,),
    get: _axes.Get = None,
    solver: str = 'auto',
    tol: float = 1e-10,
    maxiter: Optional[int] = None,
    preconditioner: str = 'nystrom',
    logdet_probes: int = 32,
    logdet_steps: int = 100,
    key: Optional[jax.Array] = None,
) -> Any:
  """Log marginal likelihood `log N(y_train | 0, K ⊗ I)` of the NNGP or NTK GP.

  With `K` `(n, n)` (after `make_2d`, plus `diag_reg`) and the `R` columns
  `y_r` of `y_train` along `trace_axes` (Rasmussen & Williams 2006, Eq. 2.30):

    log p(y) = -½ Σ_r y_rᵀ K⁻¹ y_r - (R/2) log det K - (n R / 2) log 2π.

  NT's paper (Fig. 3) selects models by the negative of this divided by
  `y_train.size`. With `solver='cg'` the quadratic term comes from CG and
  `log det K` is a stochastic Lanczos quadrature estimate (`logdet_probes`
  probes of `logdet_steps` steps, error `∝ 1/√probes`); with Cholesky both
  are exact.

  Args:
    k_train_train: `(N, N, ...)` array, namedtuple, `Kernel` or
      `KernelOperator`.
    y_train: `(N, ..., C)` targets.
    diag_reg, diag_reg_absolute_scale, trace_axes: as in `gp_inference`.
    get: `'nngp'`, `'ntk'` or a tuple; `None` is the array itself, or every
      one of `('nngp', 'ntk')` present in a namedtuple / `Kernel`.
    solver, tol, maxiter, preconditioner: as in `gp_inference`.
    logdet_probes, logdet_steps, key: stochastic log-determinant options.

  Returns:
    A scalar for an array kernel or a string `get`, else a namedtuple of
    scalars with fields `get`.
  """
  y_train = jnp.asarray(y_train)
  trace_axes = _axes.canonicalize_axis(trace_axes, y_train.ndim)
  single, gets = _axes.canonicalize_get(get)
  if gets is None:
    if _axes.is_array(k_train_train) or solvers.is_operator(k_train_train):
      single, gets = True, ('nngp',)
    else:
      gets = tuple(g for g in ('nngp', 'ntk')
                   if _axes.has_attr(k_train_train, g))
  _validate(k_train_train, y_train, trace_axes, gets)
  train_shape = tuple(_axes.get_first(k_train_train).shape[1::2])
  solve = _solver_cache(k_train_train, diag_reg, diag_reg_absolute_scale,
                        solver, tol, maxiter, preconditioner=preconditioner,
                        logdet_probes=logdet_probes,
                        logdet_steps=logdet_steps, key=key)
  out = {}
  for g in gets:
    s = solve(g)
    alpha = dynamics.solve_along(s, train_shape, y_train, trace_axes)
    y = jnp.moveaxis(y_train, trace_axes, range(-len(trace_axes), 0))
    n, r = s.n, y_train.size // s.n
    quad = jnp.sum(y.reshape(alpha.shape) * alpha)
    out[g] = -0.5 * quad - 0.5 * r * s.logdet() - 0.5 * n * r * np.log(
        2 * np.pi)
  dynamics.check_result(out, _HINT)
  return _axes.named_output('MarginalLogLikelihoods', out, single, gets)

