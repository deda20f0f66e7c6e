"""Linearization and Taylor expansion of a function around given parameters."""

from __future__ import annotations

from typing import Any, Callable

import jax
import tree_math as tm

PyTree = Any


def linearize(f: Callable[..., PyTree], params: PyTree) -> Callable[..., PyTree]:
  """First-order Taylor expansion of `f` in its parameters around `params`.

  Args:
    f: `f(params, *args, **kwargs)` returning a pytree.
    params: the expansion point.

  Returns:
    `f_lin(p, *args, **kwargs) = f(params, ...) + J(params)·(p - params)`, with
    `f`'s signature; differentiable in `p` (a JVP of `f`), so it trains like
    `f` under `jax.grad` and optimisers.
  """

  def f_lin(p: PyTree, *args, **kwargs) -> PyTree:
    dp = (tm.Vector(p) - tm.Vector(params)).tree
    out, tangent = jax.jvp(lambda q: f(q, *args, **kwargs), (params,), (dp,))
    return (tm.Vector(out) + tm.Vector(tangent)).tree

  return f_lin


def taylor_expand(f: Callable[..., PyTree], params: PyTree,
                  degree: int) -> Callable[..., PyTree]:
  """Taylor expansion of `f` of order `degree` in its parameters.

  Args:
    f: `f(params, *args, **kwargs)` returning a pytree.
    params: the expansion point.
    degree: the order (0 gives the constant `f(params)`).

  Returns:
    `f_tayl(p, *args, **kwargs) = Σ_{k ≤ degree} D^k f(params)[dp, …, dp] / k!`
    with `dp = p - params`, from nested JVPs; same signature as `f`.
  """
  if degree < 0:
    raise ValueError(f'`degree` must be non-negative, got {degree}.')

  def f_tayl(p: PyTree, *args, **kwargs) -> PyTree:
    dp = (tm.Vector(p) - tm.Vector(params)).tree

    def expand(g, k):
      # g(q) = D^k f(q)[dp, …, dp]; the series is g(params) + expand(Dg)/(k+1).
      if k == degree:
        return g(params)
      dg = lambda q: jax.jvp(g, (q,), (dp,))[1]
      rest = expand(dg, k + 1)
      return (tm.Vector(g(params)) + tm.Vector(rest) / (k + 1)).tree

    return expand(lambda q: f(q, *args, **kwargs), 0)

  return f_tayl
