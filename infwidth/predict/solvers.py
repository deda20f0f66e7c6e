"""Linear solves with a kernel matrix: Cholesky, or matrix-free CG.

`make_solver` returns `solve(b) = (K + reg·I)⁻¹ b` for a matrix `K`, either
by a Cholesky factorisation (exact, `O(N³)` time, `O(N²)` memory) or by
preconditioned conjugate gradients, which only ever multiplies by `K` and
never factorises or inverts it. CG also accepts a `KernelOperator`, which
computes `K @ v` from a kernel function in row blocks without storing `K`,
so that `N` is limited by time rather than memory.

Preconditioners. CG needs about `√κ` iterations per decade of accuracy, and
`κ = (λ_1 + reg) / (λ_min + reg)` is large for NNGP/NTK kernels: a few large
eigenvalues (the constant and linear modes) and a fast-decaying tail. The
default, randomized Nyström (`nystrom_preconditioner`), captures the top
`rank` eigenpairs from one product `K Ω` (one pass over a matrix-free kernel,
the cost of one CG iteration) and flattens them, leaving
`κ ≈ (λ_rank + reg) / (λ_min + reg)`; it factorises only an `(r, r)` sketch.
On the arc-cosine kernel of `benchmarks/bench_predict.py` (N = 4096,
`diag_reg=1e-4`) it cuts CG from 227 iterations (Jacobi) to 77 (rank 256) at `tol=1e-8`.
`'jacobi'` (the diagonal) is free and helps only when the diagonal varies
(unnormalised inputs).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import jax.scipy as jsp
import numpy as np

from infwidth.predict import checks

SOLVERS = ('cholesky', 'cg', 'auto')


class KernelOperator:
  """A kernel matrix `kernel_fn(x1, x2, get)` that is never stored.

  `K @ v` is computed by `lax.map` over blocks of `block_size` rows of `x1`,
  so peak memory is `O(block_size · N2)` instead of `O(N1 · N2)`. Only
  kernels with traced output axes, of shape `(N1, N2)`, are supported.

  Attributes:
    shape: `(N1, N2)`.
    dtype: the kernel's dtype.
  """

  def __init__(self, kernel_fn: Callable[..., Any], x1: jax.Array,
               x2: Optional[jax.Array] = None, get: str = 'nngp',
               block_size: int = 1024, **kernel_fn_kwargs: Any):
    """Args:
      kernel_fn: `kernel_fn(x1, x2, get, **kwargs)` returning an `(n1, n2)`
        array, or a namedtuple / `Kernel` with a `get` field; must be
        traceable.
      x1: `(N1, ...)` inputs of the rows.
      x2: `(N2, ...)` inputs of the columns; `None` for `x1`.
      get: `'nngp'` or `'ntk'`.
      block_size: rows of the kernel computed at once.
      **kernel_fn_kwargs: passed on to `kernel_fn`.
    """
    self.kernel_fn, self.get, self.kwargs = kernel_fn, get, kernel_fn_kwargs
    self.x1, self.x2 = x1, x2
    self.block_size = int(min(block_size, x1.shape[0]))
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    probe = jax.eval_shape(lambda a, b: self._kernel(a, b), x1[:1],
                           x1[:1] if x2 is None else x2[:1])
    if probe.ndim != 2:
      raise ValueError('KernelOperator supports kernels of shape (N1, N2) '
                       f'only; kernel_fn returned {probe.ndim} axes.')
    self.shape, self.dtype, self.ndim = (x1.shape[0], n2), probe.dtype, 2

  def _kernel(self, a: jax.Array, b: Optional[jax.Array]) -> jax.Array:
    k = self.kernel_fn(a, b, self.get, **self.kwargs)
    return k if hasattr(k, 'shape') else getattr(k, self.get)

  def _blocks(self) -> Tuple[jax.Array, int]:
    n, b = self.x1.shape[0], self.block_size
    pad = -n % b
    x = self.x1
    if pad:  # Pad with copies of the first input: no zero-norm inputs.
      x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
    return x.reshape((-1, b) + x.shape[1:]), n

  def matvec(self, v: jax.Array) -> jax.Array:
    """`K @ v` for `v` of shape `(N2,)` or `(N2, m)`."""
    blocks, n = self._blocks()
    x2 = self.x1 if self.x2 is None else self.x2
    out = jax.lax.map(lambda xb: self._kernel(xb, x2) @ v, blocks)
    return out.reshape((-1,) + out.shape[2:])[:n]

  def diagonal(self) -> jax.Array:
    """`diag(K)`, `(N1,)`, for a square operator (`x2=None`)."""
    blocks, n = self._blocks()
    out = jax.lax.map(lambda xb: jnp.diagonal(self._kernel(xb, None)), blocks)
    return out.reshape(-1)[:n]

  def materialize(self) -> jax.Array:
    """The `(N1, N2)` matrix (only when it fits in memory)."""
    blocks, n = self._blocks()
    x2 = self.x1 if self.x2 is None else self.x2
    out = jax.lax.map(lambda xb: self._kernel(xb, x2), blocks)
    return out.reshape((-1, out.shape[-1]))[:n]

  def __matmul__(self, v: jax.Array) -> jax.Array:
    return self.matvec(v)


def kernel_operator(kernel_fn: Callable[..., Any], x1: jax.Array,
                    x2: Optional[jax.Array] = None, get: Any = 'nngp',
                    block_size: int = 1024, **kernel_fn_kwargs: Any) -> Any:
  """Matrix-free kernel(s) for `gp_inference(..., solver='cg')`.

  Args:
    kernel_fn: `kernel_fn(x1, x2, get, **kwargs)`, traceable.
    x1: `(N1, ...)` inputs.
    x2: `(N2, ...)` inputs, `None` for `x1`.
    get: `'nngp'`, `'ntk'` or a tuple of them.
    block_size: rows computed at once (peak memory `block_size · N2`).
    **kernel_fn_kwargs: passed on to `kernel_fn`.

  Returns:
    A `KernelOperator` for a string `get`, else a namedtuple of them with
    fields `get`, usable wherever `gp_inference` and
    `marginal_log_likelihood` take a kernel. Pass `solver='cg'`: with
    `'auto'` or `'cholesky'` the kernel is materialised (when it fits).
  """
  import collections
  if isinstance(get, str):
    return KernelOperator(kernel_fn, x1, x2, get, block_size,
                          **kernel_fn_kwargs)
  cls = collections.namedtuple('KernelOperators', tuple(get))
  return cls(*(KernelOperator(kernel_fn, x1, x2, g, block_size,
                              **kernel_fn_kwargs) for g in get))


def is_operator(k: Any) -> bool:
  return isinstance(k, KernelOperator)


def regularizer(diagonal: jax.Array, diag_reg: float,
                diag_reg_absolute_scale: bool) -> jax.Array:
  """The added diagonal: `diag_reg`, times `mean(diag K)` unless absolute."""
  if diag_reg_absolute_scale:
    return jnp.asarray(diag_reg, diagonal.dtype)
  return diag_reg * jnp.mean(diagonal)


def add_diagonal_regularizer(a: jax.Array, diag_reg: float,
                             diag_reg_absolute_scale: bool) -> jax.Array:
  """`A + reg·I` for a matrix `A` `(n, n)` (NT's `_add_diagonal_regularizer`)."""
  reg = regularizer(jnp.diagonal(a), diag_reg, diag_reg_absolute_scale)
  i = jnp.arange(a.shape[0])
  return jnp.asarray(a).at[i, i].add(reg.astype(a.dtype))  # No (n, n) eye.


def available_bytes() -> int:
  """Memory free on the default device (host RAM on CPU)."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))


def choose_solver(solver: str, n: int, dtype: Any) -> str:
  """Resolves `'auto'`: Cholesky if its `3 n²` entries fit in half the memory.

  Three matrices are live during factorisation: the kernel, its regularised
  copy and the factor.
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}.')
  if solver != 'auto':
    return solver
  needed = 3 * n * n * np.dtype(dtype).itemsize
  return 'cholesky' if needed <= available_bytes() // 2 else 'cg'


class CGInfo(NamedTuple):
  """Diagnostics of a CG solve: iterations and final relative residuals."""
  iterations: jax.Array
  residual: jax.Array


class Preconditioner(NamedTuple):
  """`P⁻¹ v = inv_diag ⊙ v + U (d ⊙ (Uᵀ v))`: Jacobi (`U` empty) or Nyström.

  Attributes:
    inv_diag: `(n, 1)`.
    u: `(n, r)` orthonormal columns (`r = 0` for Jacobi).
    d: `(r,)` eigenvalue corrections.
  """
  inv_diag: jax.Array
  u: jax.Array
  d: jax.Array

  def __call__(self, v: jax.Array) -> jax.Array:
    return self.inv_diag * v + self.u @ (self.d[:, None] * (self.u.T @ v))


def jacobi_preconditioner(diagonal: jax.Array) -> Preconditioner:
  """`P = diag(A)`, for a positive diagonal `(n,)`."""
  inv = jnp.where(diagonal > 0, 1 / jnp.where(diagonal > 0, diagonal, 1.), 1.)
  return Preconditioner(inv[:, None], jnp.zeros((diagonal.shape[0], 0),
                                                diagonal.dtype),
                        jnp.zeros((0,), diagonal.dtype))


def nystrom_preconditioner(matvec: Callable[[jax.Array], jax.Array], n: int,
                           rank: int, mu: jax.Array, dtype: Any,
                           key: jax.Array) -> Preconditioner:
  """Randomized Nyström preconditioner for `A = K + μ I` (Frangella, Tropp &
  Udell 2023, "Randomized Nyström preconditioning", Alg. 2.1 and Eq. 5.3).

  From one product `K Ω` with a random `(n, r)` orthonormal `Ω`, the rank-`r`
  approximation `K ≈ U Λ Uᵀ` gives `P⁻¹ = (λ_r + μ) U (Λ + μ)⁻¹ Uᵀ + I - UUᵀ`:
  the top `r` eigenvalues of `A` are mapped to about `λ_r + μ`, so CG needs
  `O(√((λ_r + μ) / (λ_min + μ)))` iterations instead of
  `O(√((λ_1 + μ) / (λ_min + μ)))`. Kernel spectra decay fast, so
  `λ_r ≪ λ_1`. Only the `(r, r)` sketch core is factorised, never `K`.

  Args:
    matvec: `v (n, r) -> K v` (without the shift `μ`).
    n, rank: sizes; `rank < n`.
    mu: the shift `μ ≥ 0`.
    dtype: floating dtype.
    key: PRNG key for `Ω`.

  Returns:
    A `Preconditioner`.
  """
  omega, _ = jnp.linalg.qr(jax.random.normal(key, (n, rank), dtype))
  y = matvec(omega)
  nu = jnp.sqrt(n) * jnp.finfo(dtype).eps * jnp.linalg.norm(y)
  y = y + nu * omega
  c = jnp.linalg.cholesky(omega.T @ y)
  b = jax.scipy.linalg.solve_triangular(c, y.T, lower=True).T  # Y C⁻ᵀ.
  u, sigma, _ = jnp.linalg.svd(b, full_matrices=False)
  lam = jnp.maximum(sigma ** 2 - nu, 0.)
  mu = jnp.maximum(mu, jnp.finfo(dtype).tiny)
  d = (lam[-1] + mu) / (lam + mu) - 1
  ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(d))
  # A failed sketch (NaN) falls back to no preconditioning.
  return Preconditioner(jnp.ones((n, 1), dtype), jnp.where(ok, u, 0.),
                        jnp.where(ok, d, 0.))


def cg(matvec: Callable[[jax.Array], jax.Array], b: jax.Array,
       precondition: Callable[[jax.Array], jax.Array], tol: float = 1e-10,
       maxiter: Optional[int] = None,
       x0: Optional[jax.Array] = None) -> Tuple[jax.Array, CGInfo]:
  """Preconditioned conjugate gradients for all columns of `b` at once.

  Each column runs its own CG (its own step sizes); the loop stops when every
  column satisfies `‖b - A x‖ ≤ tol · ‖b‖` or after `maxiter` iterations.

  Args:
    matvec: `v (n, m) -> A v`, `A` symmetric positive definite.
    b: `(n, m)` right-hand sides.
    precondition: `v (n, m) -> P⁻¹ v`, `P` symmetric positive definite.
    tol: relative residual tolerance.
    maxiter: iteration cap, default `10 n`.
    x0: `(n, m)` starting point, default zero.

  Returns:
    `x (n, m)` and a `CGInfo`.
  """
  n = b.shape[0]
  maxiter = 10 * n if maxiter is None else int(maxiter)
  x = jnp.zeros_like(b) if x0 is None else x0
  r = b - matvec(x) if x0 is not None else b
  z = precondition(r)
  b_norm = jnp.linalg.norm(b, axis=0)
  threshold = tol * jnp.where(b_norm > 0, b_norm, 1.)

  def cond(state):
    _, r, _, _, _, i = state
    return (i < maxiter) & jnp.any(jnp.linalg.norm(r, axis=0) > threshold)

  def body(state):
    x, r, z, p, rz, i = state
    ap = matvec(p)
    pap = jnp.sum(p * ap, axis=0)
    alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.), 0.)
    x = x + alpha * p
    r = r - alpha * ap
    z = precondition(r)
    rz_new = jnp.sum(r * z, axis=0)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.), 0.)
    return x, r, z, z + beta * p, rz_new, i + 1

  rz = jnp.sum(r * z, axis=0)
  x, r, _, _, _, i = jax.lax.while_loop(cond, body, (x, r, z, z, rz, 0))
  residual = jnp.linalg.norm(r, axis=0) / jnp.where(b_norm > 0, b_norm, 1.)
  return x, CGInfo(i, residual)


@functools.partial(jax.jit, static_argnames=('maxiter',))
def _cg_dense(a: jax.Array, reg: jax.Array, b: jax.Array,
              precondition: Preconditioner, tol: float,
              maxiter: Optional[int]) -> Tuple[jax.Array, CGInfo]:
  return cg(lambda v: a @ v + reg * v, b, precondition, tol, maxiter)


@functools.partial(jax.jit, static_argnames=('rank',))
def _nystrom_dense(a: jax.Array, rank: int, mu: jax.Array,
                   key: jax.Array) -> Preconditioner:
  return nystrom_preconditioner(lambda v: a @ v, a.shape[0], rank, mu,
                                a.dtype, key)


class Solver:
  """`solve(b) = (K + reg·I)⁻¹ b` and `log det(K + reg·I)` for one kernel.

  Build with `make_solver`. `b` is `(n, m)` with `n = K.shape[0]`.
  """

  def __init__(self, method: str, n: int, solve: Callable[..., jax.Array],
               logdet: Callable[[], jax.Array]):
    self.method, self.n, self._solve, self.logdet = method, n, solve, logdet

  def __call__(self, b: jax.Array) -> jax.Array:
    return self._solve(b)


def make_solver(k: Any, diag_reg: float, diag_reg_absolute_scale: bool,
                solver: str = 'cholesky', tol: float = 1e-10,
                maxiter: Optional[int] = None, name: str = 'k_train_train',
                preconditioner: str = 'nystrom', rank: int = 256,
                logdet_probes: int = 32, logdet_steps: int = 100,
                key: Optional[jax.Array] = None) -> Solver:
  """A `Solver` for a kernel given as a matrix `(n, n)` or `KernelOperator`.

  Args:
    k: `(n, n)` matrix (already `make_2d`) or a square `KernelOperator`.
    diag_reg, diag_reg_absolute_scale: as in the predictors.
    solver: `'cholesky'`, `'cg'` or `'auto'` (see `choose_solver`).
    tol, maxiter: CG options.
    name: how errors name the kernel.
    preconditioner: `'nystrom'` (rank-`rank` randomized Nyström) or
      `'jacobi'` (the diagonal).
    rank: Nyström rank (at most `n // 2`).
    logdet_probes, logdet_steps, key: stochastic Lanczos quadrature options
      for `logdet` with CG (`key` also draws the Nyström sketch).

  Returns:
    A `Solver`. Cholesky raises `NotPositiveDefiniteError` (eagerly; see
    `checks`) if the factor has NaNs.
  """
  n = k.shape[0]
  method = choose_solver(solver, n, k.dtype)
  operator = is_operator(k)
  if method == 'cholesky':
    a = k.materialize() if operator else k
    a = add_diagonal_regularizer(a, diag_reg, diag_reg_absolute_scale)
    factor = jsp.linalg.cho_factor(a, lower=False)
    checks.check(
        jnp.all(jnp.isfinite(factor[0])),
        f'`{name}` ({n}x{n}) is not positive definite enough to be '
        'factorised: its Cholesky factorisation failed (NaN). Pass a '
        'diagonal regulariser, e.g. `diag_reg=1e-6` (relative to the mean '
        'of the diagonal), or use float64.', checks.NotPositiveDefiniteError)
    solve = lambda b: jsp.linalg.cho_solve(factor, b)
    # log det A = 2 Σ log diag(U) for A = UᵀU.
    logdet = lambda: 2 * jnp.sum(jnp.log(jnp.diagonal(factor[0])))
    return Solver(method, n, solve, logdet)

  diagonal = k.diagonal() if operator else jnp.diagonal(k)
  reg = regularizer(diagonal, diag_reg, diag_reg_absolute_scale)
  mv = k.matvec if operator else (lambda v: k @ v)
  matvec = lambda v: mv(v) + reg * v
  checks.check(jnp.all(diagonal + reg > 0),
               f'`{name}` ({n}x{n}) has non-positive diagonal entries, so it '
               'is not positive definite; pass `diag_reg > 0`.',
               checks.NotPositiveDefiniteError)
  key = jax.random.PRNGKey(0) if key is None else key
  rank = int(min(rank, n // 2))
  if preconditioner == 'nystrom' and rank > 0:
    if operator:
      precondition = nystrom_preconditioner(mv, n, rank, reg, k.dtype, key)
    else:
      precondition = _nystrom_dense(k, rank, reg, key)
  elif preconditioner in ('jacobi', 'nystrom'):
    precondition = jacobi_preconditioner(diagonal + reg)
  else:
    raise ValueError('preconditioner must be "nystrom" or "jacobi", got '
                     f'{preconditioner!r}.')

  def solve(b: jax.Array) -> jax.Array:
    if operator:
      x, info = cg(matvec, b, precondition, tol, maxiter)
    else:  # Compiled once per shape, not once per kernel.
      x, info = _cg_dense(k, reg, b, precondition, tol, maxiter)
    if checks.is_concrete(info):
      worst = float(jnp.max(info.residual)) if info.residual.size else 0.
      if not np.isfinite(worst):
        raise checks.NonFiniteError(
            f'CG on `{name}` ({n}x{n}) produced NaN: the kernel is not '
            'positive definite; pass `diag_reg > 0`.')
      if worst > tol:
        warnings.warn(
            f'CG on `{name}` ({n}x{n}) stopped after {int(info.iterations)} '
            f'iterations at relative residual {worst:.2e} > tol={tol:.1e}; '
            'raise `maxiter` or `diag_reg`.', RuntimeWarning, stacklevel=3)
    return x

  def logdet() -> jax.Array:
    if operator:
      return slq_logdet(matvec, n, diagonal.dtype, logdet_probes,
                        logdet_steps, jax.random.fold_in(key, 1))
    return _slq_dense(k, reg, logdet_probes, logdet_steps,
                      jax.random.fold_in(key, 1))

  return Solver(method, n, solve, logdet)


@functools.partial(jax.jit, static_argnames=('probes', 'steps'))
def _slq_dense(a: jax.Array, reg: jax.Array, probes: int, steps: int,
               key: jax.Array) -> jax.Array:
  return slq_logdet(lambda v: a @ v + reg * v, a.shape[0], a.dtype, probes,
                    steps, key)


def slq_logdet(matvec: Callable[[jax.Array], jax.Array], n: int, dtype: Any,
               probes: int = 32, steps: int = 100,
               key: Optional[jax.Array] = None) -> jax.Array:
  """Stochastic Lanczos quadrature estimate of `log det A` (Ubaru et al. 2017).

  `log det A = tr log A ≈ (n / P) Σ_p Σ_j τ_pj² log θ_pj`, where `θ_pj`,
  `τ_pj` are the eigenvalues and first eigenvector components of the Lanczos
  tridiagonal matrix started from the `p`-th unit Rademacher probe.

  Args:
    matvec: `v (n, P) -> A v`, `A` symmetric positive definite.
    n: size of `A`.
    dtype: floating dtype.
    probes: number of probe vectors `P`.
    steps: Lanczos steps (at most `n`).
    key: PRNG key for the probes (default `PRNGKey(0)`).

  Returns:
    A scalar estimate; its standard error falls like `1/√P`.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  steps = int(min(steps, n))
  z = jax.random.rademacher(key, (n, probes), dtype) / np.sqrt(n)

  def body(carry, _):
    q, q_prev, beta_prev = carry
    w = matvec(q) - beta_prev * q_prev
    alpha = jnp.sum(w * q, axis=0)
    w = w - alpha * q
    beta = jnp.linalg.norm(w, axis=0)
    ok = beta > 1e3 * jnp.finfo(dtype).eps * jnp.abs(alpha)
    q_next = jnp.where(ok, w / jnp.where(ok, beta, 1.), 0.)
    beta = jnp.where(ok, beta, 0.)
    return (q_next, q, beta), (alpha, beta)

  zeros = jnp.zeros((probes,), dtype)
  _, (alphas, betas) = jax.lax.scan(body, (z, jnp.zeros_like(z), zeros),
                                    None, length=steps)
  t = (jax.vmap(jnp.diag, 1)(alphas)
       + jax.vmap(lambda b: jnp.diag(b, 1), 1)(betas[:-1])
       + jax.vmap(lambda b: jnp.diag(b, -1), 1)(betas[:-1]))
  theta, u = jnp.linalg.eigh(t)
  tau2 = u[:, 0, :] ** 2
  safe = jnp.where(theta > 0, theta, 1.)
  return n * jnp.mean(jnp.sum(jnp.where(theta > 0, tau2 * jnp.log(safe), 0.),
                              axis=-1))
