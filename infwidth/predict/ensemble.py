"""Mean and covariance of an infinite ensemble of infinite networks over time.

Lee et al. 2019 (§2.3, Eq. 15-16): with NNGP `K`, NTK `Θ`, `A_t = Θ⁻¹ (I -
e^{-ηΘt/n})` (`n = y_train.size`, NT's time convention), the outputs of an
infinite ensemble trained by gradient flow on MSE are Gaussian with

  μ_t(x) = Θ(x, X) A_t Y,
  Σ_t(x, x) = K(x, x) + Θ(x, X) A_t K A_tᵀ Θ(X, x)
              - (Θ(x, X) A_t K(X, x) + h.c.).

`get='nngp'` is Bayesian inference (training only the readout): `Θ → K`, and
`Σ_t = K(x, x) - K(x, X) K⁻¹ (I - e^{-2ηKt/n}) K(X, x)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from infwidth.kernel import kernel_namedtuple
from infwidth.predict import _axes
from infwidth.predict import checks
from infwidth.predict import dynamics
from infwidth.predict import gp


def _dependency(gets: Tuple[str, ...], compute_cov: bool) -> Tuple[str, ...]:
  for g in gets:
    if g not in ('nngp', 'ntk'):
      raise NotImplementedError(
          f'Can only get either "nngp" or "ntk" predictions, got {g}.')
  dep = ()
  if 'nngp' in gets or ('ntk' in gets and compute_cov):
    dep += ('nngp',)
  if 'ntk' in gets:
    dep += ('ntk',)
  return dep


def _is_array_tree(x: Any) -> bool:
  return all(_axes.is_array(l) for l in jax.tree_util.tree_leaves(x))


def _field(k: Any, g: str) -> jax.Array:
  return k if _axes.is_array(k) else getattr(k, g)


@functools.partial(jax.jit, static_argnames=('g', 'n', 'ref_shape',
                                             't_shape', 'trace_axes'))
def _finite_time(evals, evecs, t, y_flat, k_td, nngp_td, nngp_dd, nngp_tt,
                 g, n, ref_shape, t_shape, trace_axes):
  """Mean [and covariance] at times `t` `(T, 1)` (Eq. 15-16, see above).

  `k_td` is `None` for the training set, `nngp_tt` `None` for the mean only.
  """
  last_t_axes = tuple(range(-len(trace_axes), 0))
  # A_t = Θ⁻¹ (I - e^{-Θt/n}) = V diag(-inv_expm1) Vᵀ (Eq. 15).
  neg_inv_expm1 = -dynamics.inv_expm1_fn(evals, t, n)
  if k_td is None:
    mean = dynamics._in_eigenbasis(  # pylint: disable=protected-access
        evecs, -dynamics.expm1_fn(evals, t, n), y_flat)
  else:
    ktd = _axes.make_2d(k_td)
    mean = jnp.einsum('lj,tj...->tl...', ktd, dynamics._in_eigenbasis(  # pylint: disable=protected-access
        evecs, neg_inv_expm1, y_flat))
  mean = mean.reshape(t_shape + ref_shape + y_flat.shape[1:])
  mean = jnp.moveaxis(mean, last_t_axes, trace_axes)
  if nngp_tt is None:
    return mean
  nngp_dd = _axes.make_2d(nngp_dd)
  lam = jnp.maximum(evals, 0.)
  if k_td is None:
    if g == 'nngp':
      # Σ_t(X, X) = K e^{-2Kt/n}.
      cov = jnp.einsum('ji,ti,ki->tjk', evecs,
                       lam * jnp.exp(-2 * lam * t / n), evecs)
    else:
      # Σ_t(X, X) = e^{-Θt/n} K e^{-Θt/n}.
      e = jnp.einsum('mi,ti,ki->tmk', evecs, jnp.exp(-lam * t / n), evecs)
      cov = jnp.einsum('tmk,kl,tnl->tmn', e, nngp_dd, e)
  else:
    nngp_t = _axes.make_2d(nngp_tt)[None]
    kv = ktd @ evecs
    if g == 'nngp':
      a2 = -dynamics.inv_expm1_fn(evals, 2 * t, n)
      cov = nngp_t - jnp.einsum('mi,ti,li->tml', kv, a2, kv)
    else:
      term_1 = jnp.einsum('mi,ti,li->tml', evecs, neg_inv_expm1, kv)
      term_2 = jnp.einsum('mi,ti,li->tml', kv, neg_inv_expm1,
                          _axes.make_2d(nngp_td) @ evecs)
      term_2 = term_2 + jnp.swapaxes(term_2, 1, 2)
      cov = jnp.einsum('tji,jk,tkl->til', term_1, nngp_dd, term_1)
      cov = cov - term_2 + nngp_t
  cov = cov.reshape(t_shape + ref_shape * 2)
  return mean, _axes.zip_axes(cov, len(t_shape))


def gradient_descent_mse_ensemble(
    kernel_fn: Callable[..., Any],
    x_train: jax.Array,
    y_train: jax.Array,
    learning_rate: float = 1.,
    diag_reg: float = 0.,
    diag_reg_absolute_scale: bool = False,
    trace_axes: _axes.Axes = (-1,),
    solver: str = 'auto',
    tol: float = 1e-10,
    maxiter: Optional[int] = None,
    preconditioner: str = 'nystrom',
    **kernel_fn_train_train_kwargs: Any,
) -> Callable[..., Any]:
  """Gaussian outputs of an infinite ensemble trained by gradient flow on MSE.

  Finite times use the eigendecomposition of the train-train kernel; `t=None`
  (infinite time) is `gp_inference` with `solver`. Errors as `gp_inference`.

  Args:
    kernel_fn: `kernel_fn(x1, x2, get, **kwargs)` returning an array for a
      string `get` and a namedtuple / `Kernel` for a tuple.
    x_train: `(N, ...)` training inputs.
    y_train: `(N, ..., C)` targets.
    learning_rate: step size `η`.
    diag_reg, diag_reg_absolute_scale, trace_axes: as in `gp_inference`.
    solver, tol, maxiter, preconditioner: linear solver for `t=None` (see
      `gp_inference`).
    **kernel_fn_train_train_kwargs: passed to `kernel_fn` for the train-train
      kernel; also to the test kernels unless overridden (tuples of two
      arrays are split into train and test parts, as in NT).

  Returns:
    `predict_fn(t=None, x_test=None, get=None, compute_cov=False,
    **kernel_fn_test_test_kwargs)` returning the mean `(T..., M, ..., C)`,
    or a `Gaussian` with covariance `(T..., M, M, ...)` if `compute_cov`,
    per `get` (`'nngp'`, `'ntk'`, a tuple; `None` is both).
  """
  y_train = jnp.asarray(y_train)
  n = y_train.size
  trace_axes = _axes.canonicalize_axis(trace_axes, y_train.ndim)
  trace_axes = tuple(-y_train.ndim + a for a in trace_axes)
  last_t_axes = tuple(range(-len(trace_axes), 0))
  trace_shape = tuple(y_train.shape[a] for a in trace_axes)
  y_flat = jnp.moveaxis(y_train, trace_axes, last_t_axes).reshape(
      (-1,) + trace_shape)
  k_dd_cache: Dict[str, jax.Array] = {}

  def get_k_train_train(gets: Tuple[str, ...]) -> Dict[str, jax.Array]:
    missing = tuple(g for g in gets if g not in k_dd_cache)
    if len(missing) == 1:
      k_dd_cache[missing[0]] = _field(
          kernel_fn(x_train, None, missing[0], **kernel_fn_train_train_kwargs),
          missing[0])
    elif missing:
      k = kernel_fn(x_train, None, missing, **kernel_fn_train_train_kwargs)
      k_dd_cache.update({g: _field(k, g) for g in missing})
    for g in gets:
      _axes.check_kernel_targets(k_dd_cache[g], y_train,
                                 _axes.canonicalize_axis(trace_axes,
                                                         y_train.ndim),
                                 f'kernel_fn(x_train, None, {g!r})')
    return {g: k_dd_cache[g] for g in gets}

  @checks.memoize_concrete
  def eigenspace(g: str) -> Tuple[jax.Array, jax.Array]:
    return dynamics.checked_eigh(
        _axes.make_2d(get_k_train_train((g,))[g]), diag_reg,
        diag_reg_absolute_scale, f'kernel_fn(x_train, None, {g!r})')

  @functools.lru_cache(4)
  def predict_inf(dep: Tuple[str, ...]) -> Callable[..., Any]:
    k_dd = kernel_namedtuple(dep)(**get_k_train_train(dep))
    return gp.gp_inference(k_dd, y_train, diag_reg, diag_reg_absolute_scale,
                           trace_axes, solver, tol, maxiter, preconditioner)

  def get_kernels(dep, x_test, compute_cov, **test_kwargs):
    k_dd = get_k_train_train(dep)
    if x_test is None:
      return k_dd, None, (compute_cov or None)
    kwargs_td = dict(kernel_fn_train_train_kwargs)
    kwargs_tt = dict(kernel_fn_train_train_kwargs)
    for k, v_tt in test_kwargs.items():
      v_dd = kernel_fn_train_train_kwargs.get(k)
      if _is_array_tree(v_dd) and _is_array_tree(v_tt):
        if (isinstance(v_dd, tuple) and len(v_dd) == 2 and
            isinstance(v_tt, tuple) and len(v_tt) == 2):
          v_td = (v_tt[0], v_dd[0])
        else:
          v_td = v_tt
      elif v_dd != v_tt:
        raise ValueError(f'Same keyword argument {k} of `kernel_fn` is set to '
                         f'different values {v_dd} != {v_tt} when computing '
                         'the train-train and test-train/test-test kernels.')
      else:
        v_td = v_tt
      kwargs_td[k], kwargs_tt[k] = v_td, v_tt
    k_td = kernel_fn(x_test, x_train, dep, **kwargs_td)
    k_td = {g: _field(k_td, g) for g in dep}
    nngp_tt = (_field(kernel_fn(x_test, None, 'nngp', **kwargs_tt), 'nngp')
               if compute_cov else None)
    return k_dd, k_td, nngp_tt

  def predict_fn(t: Any = None, x_test: Optional[jax.Array] = None,
                 get: _axes.Get = None, compute_cov: bool = False,
                 **kernel_fn_test_test_kwargs: Any) -> Any:
    """Ensemble mean [and covariance] on `x_test` at time[s] `t`.

    Args:
      t: scalar or array of times (steps); `None` is infinite time.
      x_test: `(M, ...)` test inputs; `None` for the (unregularised)
        training set.
      get: `'nngp'`, `'ntk'`, a tuple of them, or `None` for both.
      compute_cov: also return the covariance.
      **kernel_fn_test_test_kwargs: overrides for the test kernels.

    Returns:
      Per `get`, the mean or a `Gaussian(mean, covariance)`, with leading
      axes `t.shape`; a namedtuple `Gaussians` unless `get` is a string.
    """
    single, gets = _axes.canonicalize_get(get)
    gets = ('nngp', 'ntk') if gets is None else gets
    dep = _dependency(gets, compute_cov)
    k_dd, k_td, nngp_tt = get_kernels(dep, x_test, compute_cov,
                                      **kernel_fn_test_test_kwargs)
    if t is None:
      k_td_nt = None if k_td is None else kernel_namedtuple(dep)(**k_td)
      return predict_inf(dep)(get=(gets[0] if single else gets),
                              k_test_train=k_td_nt, k_test_test=nngp_tt)

    t = jnp.asarray(t) * learning_rate
    t_shape = t.shape
    t = t.reshape((-1, 1))
    ref = next(iter((k_dd if k_td is None else k_td).values()))

    out = {}
    for g in gets:
      evals, evecs = eigenspace(g)
      res = _finite_time(
          evals, evecs, t, y_flat, None if k_td is None else k_td[g],
          None if k_td is None or nngp_tt is None else k_td['nngp'],
          None if nngp_tt is None else k_dd['nngp'], nngp_tt,
          g=g, n=n, ref_shape=tuple(ref.shape[::2]), t_shape=t_shape,
          trace_axes=trace_axes)
      out[g] = res if nngp_tt is None else gp.Gaussian(*res)
    dynamics.check_result(out, gp._HINT)  # pylint: disable=protected-access
    return _axes.named_output('Gaussians', out, single, gets)

  return predict_fn
