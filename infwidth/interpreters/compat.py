"""One table of primitive objects whose names or homes moved across JAX versions.

Everything that walks a jaxpr imports higher-order primitives from here, so a
JAX release that renames one needs one edit.
"""

from __future__ import annotations

from jax.extend.core import primitives as _p

jit_p = getattr(_p, 'jit_p', None) or getattr(_p, 'pjit_p')
closed_call_p = _p.closed_call_p
call_p = _p.call_p
remat_p = _p.remat_p
custom_jvp_call_p = _p.custom_jvp_call_p
# `custom_vjp_call_jaxpr` became `custom_vjp_call` (JAX 0.6.1).
custom_vjp_call_p = getattr(_p, 'custom_vjp_call_p', None) or getattr(_p, 'custom_vjp_call_jaxpr_p')
custom_lin_p = getattr(_p, 'custom_lin_p', None)

#: Primitives whose only effect is to call a sub-jaxpr: interpreters inline them.
CALL_PRIMITIVES = tuple(p for p in (jit_p, closed_call_p, call_p, remat_p,
                                    custom_jvp_call_p, custom_vjp_call_p) if p is not None)


def subjaxpr_of(eqn):
  """The primal sub-jaxpr of a call-like equation, as `(jaxpr, consts)`.

  Looks for the parameter by behaviour (`jaxpr`, `call_jaxpr`, `fun_jaxpr`),
  not by JAX version.
  """
  for name in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(name)
    if sub is None:
      continue
    if hasattr(sub, 'jaxpr'):       # ClosedJaxpr
      return sub.jaxpr, list(sub.consts)
    return sub, []
  raise KeyError(f'no sub-jaxpr found in the parameters of {eqn.primitive}')


def bind_equation(eqn, invals) -> list:
  """Applies `eqn`'s primitive to `invals`, as `jax.core.eval_jaxpr` does; a list of outputs.

  `get_bind_params` returns `params` in current JAX and returned
  `(subfuns, params)` in older releases.
  """
  bound = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bound, tuple) and len(bound) == 2 and isinstance(bound[1], dict):
    subfuns, params = bound
  else:
    subfuns, params = (), bound
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def source_of(eqn):
  """A context in which new equations get `eqn`'s source line (for re-tracing
  a jaxpr equation by equation)."""
  import contextlib
  try:
    from jax._src import source_info_util
  except ImportError:   # the location is a courtesy
    return contextlib.nullcontext()
  info = eqn.source_info
  return source_info_util.user_context(info.traceback, name_stack=info.name_stack)


def without_dead_code(closed):
  """`closed` without the equations that no output depends on (its inputs kept)."""
  from jax._src.interpreters import partial_eval as pe
  from jax.extend.core import ClosedJaxpr
  jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
  return ClosedJaxpr(jaxpr, closed.consts)
