"""Gaussian expectations of elementwise chains: the engine behind elementwise rules.

For (u, v) jointly Gaussian, an elementwise map φ of a wide layer needs
T = E[φ(u) ψ(v)] (its NNGP) and Ṫ = E[φ'(u) ψ'(v)] (its NTK factor), DESIGN §2.
`expect_pair` computes both, `expect_single` the first moment E[φ(u)].

Closed forms (`closed_forms.py`) are used when the chain is recognised:
the relu family A·min(u,0) + B·max(u,0) (relu, leaky_relu, abs, identity and
their cross-moments: arc-cosine kernels of Cho & Saul), sign and steps, erf(a·u),
sin/cos(a·u + b) and exp(a·u + b) with any means, and an affine function paired
with anything (a 1-D expectation). Everything else goes to quadrature
(`quadrature.py`): Gauss–Legendre on pieces of the Gaussian's z-line cut at the
chain's kinks and soft kinks, Gauss–Hermite for chains without any.

At zero variance (a point mass) the derivative of a chain is the mean of its
one-sided derivatives there, in closed forms and quadrature alike.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import closed_forms as cf
from infwidth.domain import quadrature as quad
from infwidth.domain.chain import Chain, Node, arg, const

__all__ = ['expect_pair', 'expect_single']


# ----------------------------------------------------------------------------
# Expectations.

def _cast(x, dtype):
  """Static scalars become Python numbers (weakly typed); arrays take `dtype`."""
  if not isinstance(x, jax.Array):
    if np.ndim(x) == 0:
      return np.asarray(x).item()
    x = np.asarray(x)
    return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x
  return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _cast_form(f: cf.Form, dtype) -> cf.Form:
  if f.kind in ('other', 'pred'):
    return f
  return cf.Form(f.kind, tuple(_cast(c, dtype) for c in f.c), _cast(f.c0, dtype))


def _cast_args(args, dtype) -> Tuple:
  return tuple(jnp.asarray(a).astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
               else jnp.asarray(a) for a in args)


def _fold_static_args(chain: Chain, args: tuple):
  """`chain` with its Python-number arguments (deterministic-valued
  parameters: a scale of ones, a zero bias) written in as constants, so
  that closed forms see them statically (`max(u·1 + 0, 0)` is a ReLU), and
  the remaining arguments."""
  static = {i: a for i, a in enumerate(args) if isinstance(a, (int, float))}
  if not static:
    return chain, args
  index = {}
  for i in range(len(args)):
    if i not in static:
      index[i] = len(index)

  def ref(r):
    if r.kind != 'arg':
      return r
    return const(float(static[r.index])) if r.index in static else arg(index[r.index])

  nodes = tuple(Node(n.prim, n.params, tuple(ref(r) for r in n.operands)) for n in chain.nodes)
  return Chain(nodes, len(index)), tuple(a for i, a in enumerate(args) if i not in static)


def _mean(m, dtype):
  return 0.0 if cf.is_static_zero(m) and not isinstance(m, np.ndarray) else jnp.asarray(m, dtype)


def expect_pair(f: Chain, f_args: tuple, g: Chain, g_args: tuple,
                mean1, mean2, var1, var2, cov, *, ntk: bool = True,
                degree: Optional[int] = None):
  """Second moment E[f(u, *f_args) g(v, *g_args)] and NTK factor E[f'(u) g'(v)].

  (u, v) is jointly Gaussian with means mean1, mean2, variances var1, var2 and
  covariance cov; derivatives are in u and v. All array inputs broadcast
  together to one output shape, e.g. (N1, N2) for a cross kernel with var1 of
  shape (N1, 1) and var2 of shape (1, N2), or (N,) for per-input variances.
  f_args / g_args arrays broadcast against that shape.

  Args:
    f, g: chains (`Chain()` is the identity).
    f_args, g_args: per-input argument arrays of f and g.
    mean1, mean2: means; the Python number 0.0 means statically zero (needed
      for the zero-mean closed forms), else arrays.
    var1, var2, cov: variances and covariance; the dtype of the result.
    ntk: whether to compute the NTK factor.
    degree: Gauss–Hermite nodes per dimension for chains that quadrature
      integrates without cuts; default `quadrature.GH_DEGREE`.

  Returns:
    (second_moment, ntk_factor or None), both of the broadcast shape.
  """
  var1, var2, cov = (jnp.asarray(x) for x in (var1, var2, cov))
  dtype = jnp.result_type(var1, var2, cov)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(float)
  var1, var2, cov = (x.astype(dtype) for x in (var1, var2, cov))
  mean1, mean2 = _mean(mean1, dtype), _mean(mean2, dtype)
  f, f_args = _fold_static_args(f, f_args)
  g, g_args = _fold_static_args(g, g_args)
  f_args, g_args = _cast_args(f_args, dtype), _cast_args(g_args, dtype)
  zero1, zero2 = isinstance(mean1, float), isinstance(mean2, float)
  return _expect_pair(f, f_args, g, g_args, None if zero1 else mean1, None if zero2 else mean2,
                      var1, var2, cov, ntk=ntk, degree=degree)


@functools.partial(jax.jit, static_argnames=('f', 'g', 'ntk', 'degree'))
def _expect_pair(f, f_args, g, g_args, mean1, mean2, var1, var2, cov, *, ntk, degree):
  # One compilation per pair of chains and shapes; means None are zero.
  dtype = var1.dtype
  mean1 = 0.0 if mean1 is None else mean1
  mean2 = 0.0 if mean2 is None else mean2
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in (mean1, mean2, var1, var2, cov)),
                               *(jnp.shape(a) for a in f_args + g_args))
  ff = _cast_form(cf.recognise(f, f_args), dtype)
  gf = _cast_form(cf.recognise(g, g_args), dtype)
  res = cf.pair_moments(ff, gf, mean1, mean2, var1, var2, cov, ntk)
  if res is None and (ff.kind == 'affine') != (gf.kind == 'affine'):
    # One side affine: a 1-D expectation of the other side suffices.
    if ff.kind == 'affine':
      sm = quad.single_quadrature(g, g_args, mean2, var2, degree=degree)
      res = cf.affine_pair(ff, sm, mean1, cf.safe_sqrt(var2), cov, ntk)
    else:
      sm = quad.single_quadrature(f, f_args, mean1, var1, degree=degree)
      res = cf.affine_pair(gf, sm, mean2, cf.safe_sqrt(var1), cov, ntk)
  if res is None:
    res = quad.pair_quadrature(f, f_args, g, g_args, mean1, mean2, var1, var2, cov,
                               ntk=ntk, degree=degree)
  t, dt = res
  t = jnp.broadcast_to(jnp.asarray(t, dtype), shape)
  if ntk:
    dt = jnp.broadcast_to(jnp.asarray(dt, dtype), shape)
  return t, (dt if ntk else None)


def expect_single(f: Chain, f_args: tuple, mean, var, *, degree: Optional[int] = None):
  """First moment E[f(u, *f_args)] for u ~ N(mean, var), of the broadcast shape.

  Args:
    f: a chain.
    f_args: per-input argument arrays, broadcast against mean and var.
    mean: the mean (Python 0.0 or an array).
    var: the variance; sets the dtype.
    degree: quadrature nodes where no closed form applies.

  Returns:
    E f(u), shape `broadcast(mean, var, *f_args)`.
  """
  var = jnp.asarray(var)
  dtype = var.dtype if jnp.issubdtype(var.dtype, jnp.floating) else jnp.result_type(float)
  var = var.astype(dtype)
  mean = _mean(mean, dtype)
  f, f_args = _fold_static_args(f, f_args)
  f_args = _cast_args(f_args, dtype)
  return _expect_single(f, f_args, None if isinstance(mean, float) else mean, var, degree=degree)


@functools.partial(jax.jit, static_argnames=('f', 'degree'))
def _expect_single(f, f_args, mean, var, *, degree):
  dtype = var.dtype
  mean = 0.0 if mean is None else mean
  shape = jnp.broadcast_shapes(jnp.shape(mean), jnp.shape(var), *(jnp.shape(a) for a in f_args))
  form = _cast_form(cf.recognise(f, f_args), dtype)
  sm = cf.single_moments(form, mean, cf.safe_sqrt(var))
  if sm is None:
    sm = quad.single_quadrature(f, f_args, mean, var, degree=degree)
  return jnp.broadcast_to(jnp.asarray(sm[0], dtype), shape)
