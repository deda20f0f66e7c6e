"""Errors for bad inputs, eagerly and under `jit`.

Outside `jit` every predictor checks its inputs and results and raises a
Python error naming the cause: a kernel that Cholesky cannot factorise
(`NotPositiveDefiniteError`, JAX's Cholesky returns NaN instead of raising),
NaN or infinite inputs, and NaN results (`NonFiniteError`).

Under `jax.jit` values are abstract and nothing can be raised: by default NaNs
propagate silently, as everywhere in JAX. Wrap the function with `checked` to
get the same checks under `jit`, through `jax.experimental.checkify`:

  >>> f = predict.checked(lambda k_td: predict_fn('nngp', k_td), jit=True)
  >>> f(k_test_train)   # raises checkify.JaxRuntimeError naming the cause
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import checkify


class NotPositiveDefiniteError(ValueError):
  """A kernel matrix is not positive definite enough to be factorised."""


class NonFiniteError(FloatingPointError):
  """An input or a result of a predictor holds NaN or infinite values."""


_STATE = threading.local()


def _checks_staged() -> bool:
  return getattr(_STATE, 'staged', False)


@contextlib.contextmanager
def _staged_checks():
  old = _checks_staged()
  _STATE.staged = True
  try:
    yield
  finally:
    _STATE.staged = old


def is_concrete(x: Any) -> bool:
  """Whether `x` holds values now (is not traced under `jit`/`vmap`/...)."""
  return not any(isinstance(l, jax.core.Tracer)
                 for l in jax.tree_util.tree_leaves(x))


def tracing() -> bool:
  """Whether the caller runs inside a `jit` (or other staging) trace."""
  return isinstance(jnp.zeros(()), jax.core.Tracer)


def memoize_concrete(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Memoises `fn(*hashable_args)`, except for results computed under a trace.

  Factorisations are computed once per predictor and reused across calls,
  as in NT; a result computed inside `jit` holds tracers of that trace and
  must not outlive it, so it is recomputed per trace instead.
  """
  cache = {}

  @functools.wraps(fn)
  def wrapper(*args):
    if args in cache:
      return cache[args]
    out = fn(*args)
    if not tracing():
      cache[args] = out
    return out

  return wrapper


def check(predicate: Any, message: str,
          error: type = NonFiniteError) -> None:
  """Raises `error(message)` if `predicate` is False.

  Eagerly the check is a Python `if`. Traced inside `checked`, it becomes a
  `checkify.check`; traced anywhere else it is skipped.
  """
  if is_concrete(predicate):
    if not bool(predicate):
      raise error(message)
  elif _checks_staged():
    checkify.check(predicate, message.replace('{', '{{').replace('}', '}}'))


def check_finite(x: Any, what: str, hint: str = '') -> None:
  """Raises a `NonFiniteError` if the array or number `x` holds NaN or inf."""
  if x is None or not (hasattr(x, 'dtype') or isinstance(x, (int, float))):
    return
  message = f'{what} contains NaN or infinite values.'
  check(jnp.all(jnp.isfinite(x)), message + (' ' + hint if hint else ''))


def checked(fn: Callable[..., Any], jit: bool = True) -> Callable[..., Any]:
  """`fn` with the predictors' checks active even when traced.

  Args:
    fn: a function calling predictors (pass static arguments such as `get`
      by closure).
    jit: compile the checked function with `jax.jit`.

  Returns:
    A function with `fn`'s signature that raises
    `jax.experimental.checkify.JaxRuntimeError` with the message of the
    failed check (non-positive-definite kernel, NaN input or result).
  """
  def staged(*args, **kwargs):
    with _staged_checks():
      return fn(*args, **kwargs)

  checkified = checkify.checkify(staged)
  if jit:
    checkified = jax.jit(checkified)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with _staged_checks():
      err, out = checkified(*args, **kwargs)
    err.throw()
    return out

  return wrapper


def check_symmetric(k: jax.Array, name: str) -> None:
  """Raises `NotPositiveDefiniteError` if the matrix `k` `(n, n)` is not
  symmetric up to round-off (eigendecompositions would read one triangle)."""
  if k.size == 0:
    return
  tol = jnp.sqrt(jnp.finfo(k.dtype).eps) * jnp.max(jnp.abs(k))
  gap = jnp.abs(k - k.T)
  if is_concrete(gap):
    worst = float(jnp.max(gap))
    if not worst <= float(tol):
      i, j = (int(a) for a in jnp.unravel_index(jnp.argmax(gap), gap.shape))
      raise NotPositiveDefiniteError(
          f'`{name}` ({k.shape[0]}x{k.shape[1]}) is not symmetric: entries ({i}, {j}) and '
          f'({j}, {i}) differ by {worst:.3g} (largest entry {float(jnp.max(jnp.abs(k))):.3g}). '
          'A kernel of the training set with itself is symmetric: pass '
          'kernel_fn(x_train, None), not a test-train kernel.')
  else:
    check(jnp.max(gap) <= tol, f'`{name}` is not symmetric.', NotPositiveDefiniteError)


def check_eigenvalues(evals: jax.Array, diagonal: jax.Array, name: str, diag_reg: float,
                      diag_reg_absolute_scale: bool, n: Optional[int] = None,
                      fix: Optional[str] = None) -> None:
  """Raises `NotPositiveDefiniteError` if the eigenvalues `evals` (ascending;
  the smallest and largest suffice) of an `(n, n)` matrix `K + reg·I` go
  below zero by more than round-off, naming the smallest and the `diag_reg`
  that would lift it (as the Cholesky paths do), or `fix`."""
  if evals.size == 0:
    return
  n = evals.shape[0] if n is None else n
  # Backward error of a symmetric eigensolver: a few n·eps·‖K‖.
  tol = n * jnp.finfo(evals.dtype).eps * jnp.maximum(jnp.abs(evals[-1]), jnp.abs(evals[0]))
  ok = evals[0] >= -tol
  if not is_concrete(ok):
    check(ok, f'`{name}` is not positive semi-definite; pass `diag_reg > 0`.',
          NotPositiveDefiniteError)
    return
  if bool(ok):
    return
  lo = float(evals[0])
  scale = 1.0 if diag_reg_absolute_scale else float(jnp.mean(diagonal))
  need = (float(diag_reg) + 2 * abs(lo) / scale) if scale > 0 else float('nan')
  fix = fix or (f'Pass diag_reg={need:.2g} or more, or use float64 if the kernel is '
                'positive semi-definite in exact arithmetic.')
  raise NotPositiveDefiniteError(
      f'`{name}` ({n}x{n}) is not positive semi-definite: the smallest eigenvalue of '
      f'`{name}` + diag_reg·I is {lo:.3g} (largest {float(evals[-1]):.3g}, diag_reg={diag_reg}'
      f'{"" if diag_reg_absolute_scale else " relative to the mean of the diagonal"}). '
      f'Training along its negative directions diverges. {fix.format(need=need)}')
