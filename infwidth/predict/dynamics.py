"""Outputs of a linearised (or infinitely wide) network during training.

Gradient flow on a loss `L` moves the outputs along the NTK `Θ`
(Lee et al. 2019, "Wide neural networks of any depth evolve as linear models
under gradient descent", Eq. 7-9):

  d f_t(X) / dt = -η Θ(X, X) ∇_f L,    d f_t(x) / dt = -η Θ(x, X) ∇_f L.

For MSE, `L = ‖f - y‖² / (2 n)` with `n = y_train.size`, the flow is linear
and solved in closed form (`gradient_descent_mse`); other losses are
integrated numerically (`gradient_descent`). Times follow Neural Tangents:
`t` counts steps of size `learning_rate`, and the `1/n` of the loss is part
of the kernel's time scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from infwidth.predict import _axes
from infwidth.predict import checks
from infwidth.predict import ode as ode_lib
from infwidth.predict import solvers

ArrayOrScalar = Union[None, int, float, jax.Array, np.ndarray]


def _checked_targets(k_train_train, y_train, trace_axes):
  """`y_train` as an array and its canonical trace axes, after checking that
  the kernel and targets agree in shape and are finite."""
  y_train = jnp.asarray(y_train)
  trace_axes = _axes.canonicalize_axis(trace_axes, y_train.ndim)
  _axes.check_kernel_targets(k_train_train, y_train, trace_axes)
  checks.check_finite(k_train_train, '`k_train_train`')
  checks.check_finite(y_train, '`y_train`')
  return y_train, trace_axes


def solve_along(solver: solvers.Solver, train_shape: Tuple[int, ...],
                b: jax.Array, b_axes: Tuple[int, ...]) -> jax.Array:
  """`K⁻¹ b` where the `b_axes` of `b` are outside the kernel (NT's cho_solve).

  Args:
    solver: a `Solver` of the `make_2d` kernel.
    train_shape: `k_train_train.shape[1::2]`.
    b: array whose non-`b_axes` match `train_shape`.
    b_axes: axes of `b` that are not contracted with the kernel.

  Returns:
    `train_shape + tuple(b.shape[a] for a in b_axes)`.
  """
  b_axes = _axes.canonicalize_axis(b_axes, b.ndim)
  x_shape = tuple(train_shape) + tuple(b.shape[a] for a in b_axes)
  b = jnp.moveaxis(b, b_axes, range(-len(b_axes), 0))
  return solver(b.reshape((solver.n, -1))).reshape(x_shape)


def _in_eigenbasis(evecs: jax.Array, fn_evals: jax.Array,
                   y: jax.Array) -> jax.Array:
  """`V diag(fn_t) Vᵀ y` for each row `t` of `fn_evals` `(T, n)`; `(T, n, ...)`."""
  vty = jnp.tensordot(evecs, y, (0, 0))
  scaled = fn_evals.reshape(fn_evals.shape + (1,) * (y.ndim - 1)) * vty
  return jnp.moveaxis(jnp.tensordot(evecs, scaled, (1, 1)), 0, 1)


def expm1_fn(evals: jax.Array, t: jax.Array, n: int) -> jax.Array:
  """`exp(-λ t / n) - 1`, with negative eigenvalues (round-off) clipped to 0.

  Written so that `t = inf` gives `-1` (or 0 for `λ ≤ 0`), never NaN.
  """
  pos = evals > 0
  return jnp.where(pos, jnp.expm1(-jnp.where(pos, evals, 0.) * t / n), 0.)


def inv_expm1_fn(evals: jax.Array, t: jax.Array, n: int) -> jax.Array:
  """`(exp(-λ t / n) - 1) / λ`; 0 for `λ ≤ 0` (NT gives NaN at `λ = 0`)."""
  pos = evals > 0
  return jnp.where(pos, expm1_fn(evals, t, n) / jnp.where(pos, evals, 1.), 0.)


@functools.partial(jax.jit, static_argnames=('trace_axes', 'odd'))
def _mse_finite(evals, evecs, t, y_train, fx_train_0, fx_test_0, k_test_train,
                trace_axes, odd):
  """The finite-time closed form of `gradient_descent_mse` (one compilation
  per shape, shared by all predictors); `trace_axes` are negative."""
  n_t_axes = len(trace_axes)
  n_non_t_axes = y_train.ndim - n_t_axes
  last_t_axes = tuple(range(-n_t_axes, 0))
  non_t_axes = tuple(range(-y_train.ndim, -n_t_axes))
  rhs_shape = tuple(y_train.shape[a] for a in trace_axes)
  train_shape = tuple(y_train.shape[a] for a in range(-y_train.ndim, 0)
                      if a not in trace_axes)
  t_shape, t_ndim = t.shape, t.ndim
  first_t_axes = tuple(range(t_ndim))
  t = t.reshape((-1, 1))
  rhs = -y_train if fx_train_0 is None else fx_train_0 - y_train
  rhs = jnp.broadcast_to(rhs, y_train.shape)
  rhs = jnp.moveaxis(rhs, trace_axes, last_t_axes).reshape((-1,) + rhs_shape)
  shape = t_shape + train_shape + rhs_shape
  out = []
  if fx_train_0 is not None:
    dfx = _in_eigenbasis(evecs, expm1_fn(evals, t, y_train.size), rhs)
    dfx = jnp.moveaxis(dfx.reshape(shape), last_t_axes, trace_axes)
    out.append(jnp.expand_dims(fx_train_0, first_t_axes) + dfx)
  if fx_test_0 is not None:
    dfx = _in_eigenbasis(evecs, inv_expm1_fn(evals, t, y_train.size), rhs)
    dfx = jnp.tensordot(k_test_train, dfx.reshape(shape), (odd, non_t_axes))
    dfx = jnp.moveaxis(
        dfx, tuple(range(n_non_t_axes, n_non_t_axes + t_ndim)) + last_t_axes,
        tuple(range(t_ndim)) + trace_axes)
    out.append(jnp.expand_dims(fx_test_0, first_t_axes) + dfx)
  return out[0] if len(out) == 1 else tuple(out)


@functools.partial(jax.jit, static_argnames=('diag_reg_absolute_scale',))
def eigh_regularized(k: jax.Array, diag_reg: float,
                     diag_reg_absolute_scale: bool
                     ) -> Tuple[jax.Array, jax.Array]:
  """`eigh(K + reg·I)` of a matrix `K` `(n, n)`: `(evals (n,), evecs (n, n))`."""
  return jnp.linalg.eigh(solvers.add_diagonal_regularizer(
      k, diag_reg, diag_reg_absolute_scale))


def checked_eigh(k: jax.Array, diag_reg: float, diag_reg_absolute_scale: bool,
                 name: str) -> Tuple[jax.Array, jax.Array]:
  """`eigh_regularized`, after checking that `k` `(n, n)` is symmetric and
  raising `NotPositiveDefiniteError` where `K + reg·I` is indefinite beyond
  round-off (whose eigenvalues the finite-time solutions clip to 0)."""
  name = name.strip('`')
  checks.check_symmetric(k, name)
  evals, evecs = eigh_regularized(k, diag_reg, diag_reg_absolute_scale)
  checks.check_eigenvalues(evals, jnp.diagonal(k), name, diag_reg, diag_reg_absolute_scale)
  return evals, evecs


def check_predict_inputs(fx_train_0: Any, fx_test_0: Any,
                         k_test_train: Any) -> None:
  if fx_train_0 is None and fx_test_0 is None:
    raise ValueError('Both `fx_train_0` and `fx_test_0` are `None`, i.e. no '
                     'predictions will be computed.')
  if fx_test_0 is not None and k_test_train is None:
    raise ValueError('To get predictions on the test set, please provide '
                     '`k_test_train` kernel to the parent function.')


def check_result(x: Any, hint: str) -> None:
  """Raises `NonFiniteError` for a NaN result of finite inputs (see `checks`)."""
  for leaf in jax.tree_util.tree_leaves(x):
    checks.check_finite(leaf, 'The result', hint)


def gradient_descent_mse(
    k_train_train: jax.Array,
    y_train: jax.Array,
    learning_rate: float = 1.,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: _axes.Axes = (-1,),
    solver: str = 'auto',
    tol: float = 1e-10,
    maxiter: Optional[int] = None,
    preconditioner: str = 'nystrom',
) -> Callable[..., Any]:
  """Outputs of gradient flow on MSE, in closed form, at any time.

  With `Θ` = `k_train_train` (+ `diag_reg`), `n = y_train.size` and
  `Δ_0 = f_0(X) - Y` (Lee et al. 2019, Eq. 10-11):

    f_t(X) = f_0(X) + (e^{-ηΘt/n} - I) Δ_0,
    f_t(x) = f_0(x) + Θ(x, X) Θ⁻¹ (e^{-ηΘt/n} - I) Δ_0,

  through the eigendecomposition of `Θ` for finite `t`, and at `t=None`
  (infinite time) through one linear solve (`solver`). Eagerly, a non-finite
  input or result raises `checks.NonFiniteError` and a kernel that cannot be
  factorised raises `checks.NotPositiveDefiniteError`; under `jit` wrap the
  call with `checked` to keep these checks.

  Args:
    k_train_train: `(N, N)` or `(N, N, X, X, ...)` kernel on the training
      data: `zip(y_train.shape, y_train.shape)` without `trace_axes`.
    y_train: `(N, ..., C)` targets.
    learning_rate: step size `η`.
    diag_reg: added to the diagonal of `Θ`, times the mean of its diagonal
      unless `diag_reg_absolute_scale`.
    diag_reg_absolute_scale: `diag_reg` is in absolute units.
    trace_axes: axes of `y_train` along which the kernel is `Θ ⊗ I`.
    solver: `'cholesky'`, `'cg'` or `'auto'` for `t=None` (see `solvers`).
    tol, maxiter, preconditioner: conjugate-gradient options (see
      `gp_inference`).

  Returns:
    `predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)`
    returning `fx_train_t`, `fx_test_t` or both (`fx_*_0=None` skips that
    set), with leading axes `t.shape` for finite `t`.
  """
  y_train, trace_axes = _checked_targets(k_train_train, y_train, trace_axes)
  _, odd, _, _ = _axes.get_axes(k_train_train.ndim)
  trace_axes = tuple(-y_train.ndim + a for a in trace_axes)
  last_t_axes = tuple(range(-len(trace_axes), 0))
  train_shape = tuple(k_train_train.shape[1::2])
  hint = ('`k_train_train` may be too ill-conditioned; pass `diag_reg > 0` '
          'or use float64.')

  @checks.memoize_concrete
  def get_solver():
    return solvers.make_solver(_axes.make_2d(k_train_train), diag_reg,
                               diag_reg_absolute_scale, solver, tol, maxiter,
                               preconditioner=preconditioner)

  @checks.memoize_concrete
  def get_eigh():
    return checked_eigh(_axes.make_2d(k_train_train), diag_reg,
                        diag_reg_absolute_scale, '`k_train_train`')

  def predict_inf(fx_train_0, fx_test_0, k_test_train):
    fx_train_t = y_train.astype(k_train_train.dtype)
    if fx_test_0 is None:
      return fx_train_t
    rhs = y_train if fx_train_0 is None else y_train - fx_train_0
    dfx = jnp.tensordot(k_test_train, solve_along(get_solver(), train_shape,
                                                  rhs, trace_axes),
                        (odd, tuple(range(len(odd)))))
    fx_test_t = fx_test_0 + jnp.moveaxis(dfx, last_t_axes, trace_axes)
    if fx_train_0 is None:
      return fx_test_t
    return fx_train_t, fx_test_t

  def predict_finite(t, fx_train_0, fx_test_0, k_test_train):
    evals, evecs = get_eigh()
    t = jnp.asarray(t) * learning_rate
    return _mse_finite(evals, evecs, t, y_train, fx_train_0, fx_test_0,
                       k_test_train, trace_axes=trace_axes, odd=odd)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_0: ArrayOrScalar = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.Array] = None,
  ) -> Union[jax.Array, Tuple[jax.Array, jax.Array]]:
    """Outputs on the train [and test] set at time[s] `t`.

    Args:
      t: scalar or array of times (in steps); `None` is infinite time,
        computed by a linear solve.
      fx_train_0: `(N, ..., C)` outputs at `t = 0` on the training set
        (`None`: do not predict the training set).
      fx_test_0: `(M, ..., C)` outputs at `t = 0` on the test set (`None`:
        do not predict the test set).
      k_test_train: `(M, N, ...)` test-train kernel, needed for test outputs.

    Returns:
      `fx_train_t`, `fx_test_t` or `(fx_train_t, fx_test_t)`, with leading
      axes `t.shape`.
    """
    check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
    if k_test_train is not None:
      _axes.check_test_kernel(k_test_train, k_train_train)
      checks.check_finite(k_test_train, '`k_test_train`')
    checks.check_finite(fx_train_0, '`fx_train_0`')
    checks.check_finite(fx_test_0, '`fx_test_0`')
    if t is None:
      out = predict_inf(fx_train_0, fx_test_0, k_test_train)
    else:
      out = predict_finite(t, fx_train_0, fx_test_0, k_test_train)
    check_result(out, hint)
    return out

  return predict_fn


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ODEState:
  """State of the gradient-descent ODE (NT's `ODEState`).

  Attributes:
    fx_train: training set outputs.
    fx_test: test set outputs.
    qx_train: training set auxiliary variable (momentum).
    qx_test: test set auxiliary variable (momentum).
  """
  fx_train: Optional[jax.Array] = None
  fx_test: Optional[jax.Array] = None
  qx_train: Optional[jax.Array] = None
  qx_test: Optional[jax.Array] = None


def gradient_descent(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: jax.Array,
    y_train: jax.Array,
    learning_rate: float = 1.,
    momentum: Optional[float] = None,
    trace_axes: _axes.Axes = (-1,),
    rtol: float = 1.4e-8,
    atol: float = 1.4e-8,
    max_steps: int = 100_000,
) -> Callable[..., Any]:
  """Outputs of (momentum) gradient flow on any loss, by integrating the ODE.

  Without momentum, `df/dt = -Θ ∇_f L` in time `η t`. With momentum `μ`,
  as NT, the heavy-ball ODE `d²f/ds² = -Θ ∇_f L - ((1 - μ)/√η) df/ds` in time
  `s = √η t`. Integrated by adaptive Dormand–Prince (`ode.odeint`); jittable,
  not reverse-mode differentiable.

  Args:
    loss: `loss(fx_train, y_train)`, treating batch and output axes alike.
    k_train_train: `(N, N, ...)` NTK on the training data (see
      `gradient_descent_mse`).
    y_train: `(N, ..., C)` targets.
    learning_rate: step size `η`.
    momentum: `μ`, or `None` for plain gradient descent.
    trace_axes: axes of `y_train` along which the kernel is `Θ ⊗ I`.
    rtol, atol, max_steps: integrator options.

  Returns:
    `predict_fn(t, fx_train_or_state_0=0., fx_test_0=None,
    k_test_train=None)`; `t` must be finite and non-decreasing (`t=None`,
    infinite time, raises: use `gradient_descent_mse` for MSE).
  """
  y_train, trace_axes = _checked_targets(k_train_train, y_train, trace_axes)
  _, odd, _, _ = _axes.get_axes(k_train_train.ndim)
  non_t_axes = tuple(a for a in range(y_train.ndim) if a not in trace_axes)
  last_t_axes = tuple(range(-len(trace_axes), 0))
  dtype = k_train_train.dtype
  grad_loss = jax.grad(lambda fx: loss(fx, y_train))
  if momentum is not None:
    learning_rate = learning_rate ** 0.5
    momentum = (momentum - 1.0) / learning_rate

  def get_state_0(fx_train_or_state_0, fx_test_0, test_shape):
    if isinstance(fx_train_or_state_0, ODEState):
      s = fx_train_or_state_0
      fx_train_0, fx_test_0, qx_train_0, qx_test_0 = (
          s.fx_train, s.fx_test, s.qx_train, s.qx_test)
    else:
      fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
    fx_train_0 = (jnp.zeros_like(y_train, dtype) if fx_train_0 is None else
                  jnp.broadcast_to(fx_train_0, y_train.shape).astype(dtype))
    if fx_test_0 is not None:
      fx_test_0 = jnp.broadcast_to(fx_test_0, test_shape).astype(dtype)
    if momentum is None:
      if qx_train_0 is not None or qx_test_0 is not None:
        raise ValueError('Got passed momentum state variables, while '
                         '`momentum is None`.')
    else:
      qx_train_0 = (jnp.zeros_like(y_train, dtype) if qx_train_0 is None else
                    jnp.broadcast_to(qx_train_0, y_train.shape))
      qx_test_0 = (None if fx_test_0 is None else
                   jnp.zeros(test_shape, dtype) if qx_test_0 is None else
                   jnp.broadcast_to(qx_test_0, test_shape))
    return ODEState(fx_train_0, fx_test_0, qx_train_0, qx_test_0)

  def dstate_dt(k_test_train):
    def f(state: ODEState, unused_t) -> ODEState:
      dl = grad_loss(state.fx_train)
      # Eq. 7-8 of Lee et al. 2019: df/dt = -Θ ∇_f L.
      df_train = -jnp.moveaxis(
          jnp.tensordot(k_train_train, dl, (odd, non_t_axes)),
          last_t_axes, trace_axes)
      df_test = None
      if state.fx_test is not None:
        df_test = -jnp.moveaxis(
            jnp.tensordot(k_test_train, dl, (odd, non_t_axes)),
            last_t_axes, trace_axes)
      if momentum is None:
        return ODEState(df_train, df_test)
      df_train = df_train + momentum * state.qx_train
      if state.qx_test is not None:
        df_test = df_test + momentum * state.qx_test
      return ODEState(state.qx_train, state.qx_test, df_train, df_test)
    return f

  @jax.jit
  def integrate(state_0, t, k_test_train):
    return ode_lib.odeint(dstate_dt(k_test_train), state_0, t, rtol, atol,
                          max_steps)

  def predict_fn(
      t: ArrayOrScalar = None,
      fx_train_or_state_0: Union[ArrayOrScalar, ODEState] = 0.,
      fx_test_0: ArrayOrScalar = None,
      k_test_train: Optional[jax.Array] = None,
  ) -> Union[jax.Array, Tuple[jax.Array, jax.Array], ODEState]:
    """Outputs on the train [and test] set at time[s] `t`.

    Args:
      t: finite, non-decreasing scalar or array of times (in steps).
      fx_train_or_state_0: `(N, ..., C)` train outputs at `t = 0`, or a full
        `ODEState` (then an `ODEState` is returned and `fx_test_0` must be
        `None`).
      fx_test_0: `(M, ..., C)` test outputs at `t = 0`, or `None`.
      k_test_train: `(M, N, ...)` test-train NTK, needed for test outputs.

    Returns:
      `fx_train_t`, `fx_test_t`, both, or an `ODEState`, with leading axes
      `t.shape`. Eagerly, raises `NonFiniteError` if the integration failed.
    """
    if isinstance(fx_train_or_state_0, ODEState):
      if fx_test_0 is not None:
        raise ValueError('`fx_test_0` is included in `ODEState` and must be '
                         'set to `None`.')
      check_predict_inputs(fx_train_or_state_0.fx_train,
                           fx_train_or_state_0.fx_test, k_test_train)
    else:
      check_predict_inputs(fx_train_or_state_0, fx_test_0, k_test_train)
    if t is None or (checks.is_concrete(t) and not np.all(np.isfinite(t))):
      raise ValueError('`gradient_descent` needs finite times `t`; for MSE '
                       'use `gradient_descent_mse`, which solves `t=None` '
                       'in closed form.')
    if k_test_train is not None:
      _axes.check_test_kernel(k_test_train, k_train_train)
      checks.check_finite(k_test_train, '`k_test_train`')
    t = jnp.asarray(t, dtype) * learning_rate
    t_shape = t.shape
    t = t.reshape((-1,))
    if checks.is_concrete(t) and np.any(np.diff(np.asarray(t)) < 0):
      raise ValueError('`t` must be non-decreasing.')
    test_shape = _axes.fx_test_shape(y_train, k_test_train, trace_axes)
    state_0 = get_state_0(fx_train_or_state_0, fx_test_0, test_shape)
    checks.check_finite(state_0.fx_train, '`fx_train_0`')
    checks.check_finite(state_0.fx_test, '`fx_test_0`')
    state_t, ok = integrate(state_0, t, k_test_train)
    checks.check(ok, f'The ODE integration failed (non-finite state or more '
                 f'than max_steps={max_steps} steps): the loss gradient may '
                 'be non-finite or the learning rate too large.')
    state_t = jax.tree_util.tree_map(
        lambda x: x.reshape(t_shape + x.shape[1:]), state_t)
    if isinstance(fx_train_or_state_0, ODEState):
      return state_t
    if fx_train_or_state_0 is not None and fx_test_0 is None:
      return state_t.fx_train
    if fx_test_0 is not None and fx_train_or_state_0 is None:
      return state_t.fx_test
    return state_t.fx_train, state_t.fx_test

  return predict_fn


def max_learning_rate(
    ntk_train_train: jax.Array,
    y_train_size: Optional[int] = None,
    momentum: float = 0.,
    eps: float = 1e-12,
) -> float:
  """Largest stable learning rate of (momentum) gradient descent on MSE.

  For `L = ‖f - y‖² / (2 n)` the step `I - η Θ / n` contracts iff
  `η < 2 n / λ_max(Θ)`; with momentum `μ`, `η < 2 (1 + μ) n / λ_max(Θ)`
  (Goh 2017, "Why momentum really works").

  Args:
    ntk_train_train: `(N, N, ...)` NTK on the training data.
    y_train_size: `n`, the number of training targets; default
      `make_2d(ntk).shape[0]` (i.e. `trace_axes=()`).
    momentum: `μ`.
    eps: added to `λ_max` against division by zero.

  Returns:
    The learning rate (a float, or a traced scalar under `jit`).
  """
  k = _axes.make_2d(jnp.asarray(ntk_train_train))
  factor = k.shape[0] if y_train_size is None else y_train_size
  checks.check_symmetric(k, 'ntk_train_train')
  n = k.shape[0]
  if checks.is_concrete(k):
    a = np.asarray(k)
    evals = [scipy.linalg.eigvalsh(a, subset_by_index=(i, i))[0] for i in (0, n - 1)]
    max_eva = evals[-1]
    evals = jnp.asarray(evals, k.dtype)
  else:
    evals = jnp.linalg.eigvalsh(k)
    max_eva = evals[-1]
  checks.check_eigenvalues(
      evals, jnp.diagonal(k), 'ntk_train_train', 0.0, False, n=n,
      fix='No learning rate makes it stable; regularise the kernel (add '
      '{need:.2g}·mean(diag) or more to its diagonal), or use float64.')
  return 2 * (1 + momentum) * factor / (max_eva + eps)
