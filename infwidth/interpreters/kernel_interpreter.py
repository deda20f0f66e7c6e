"""The kernel interpreter: walks a jaxpr, mapping each equation to a kernel rule.

Values in the environment are `Det` (deterministic arrays over the joint
batch), `ParamRef` (symbolic parameters) and `Wide` values. Equations with
only deterministic inputs are evaluated concretely (constant folding);
call-like equations are inlined by the walker; an equation that meets a value
kind with a registered handler (`ChannelSum`) goes to that handler; every
other equation that touches a parameter or a wide value goes to the rule
registered for its primitive (`infwidth.rules.registry`). A missing rule, or
a rule that finds no analytic limit for the values it meets, raises
`UnsupportedPrimitiveError` naming the primitive, the reason and the user's
source line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Sequence

import jax
import numpy as np
from jax.extend.core import Literal
from jax.extend.core.primitives import broadcast_in_dim_p

from infwidth.domain import moments as M
from infwidth.domain import values as A
from infwidth.domain.errors import UnsupportedPrimitiveError
from infwidth.domain.values import Det
from infwidth.interpreters.walker import bind, body_primitives, sub_jaxprs, walk
from infwidth.rules import builtin as _builtin  # noqa: F401  (registers the rules)
from infwidth.rules import registry
from infwidth.rules.structural import default_det_roles


class RuleContext:
  """What a rule may know besides its inputs: the equation and the moment engine."""

  def __init__(self, eqn, moments: M.Moments, callers=()):
    self.eqn = eqn
    self.moments = moments
    self.callers = callers  # enclosing call equations, innermost last
    # The primitives of the equation's body, for a rule registered with
    # several bodies (a generic reduce_window: a window sum or a window max).
    self.body = None

  def unsupported(self, reason: str = '') -> UnsupportedPrimitiveError:
    """The error to raise where no analytic rule applies (names the user's line)."""
    loc = None
    for e in (self.eqn,) + tuple(reversed(self.callers)):
      loc = source_location(e)
      if loc:
        break
    return UnsupportedPrimitiveError(self.eqn.primitive, self.eqn.params, loc, reason)

  def fold(self, invals) -> Det:
    """The equation evaluated on deterministic inputs (constant folding)."""
    (out,) = fold(self.eqn, invals)
    return out


def _package_dir(module_name: str) -> Optional[str]:
  module = sys.modules.get(module_name)
  path = getattr(module, '__file__', None)
  return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


#: Packages whose frames are not the user's: infwidth itself, JAX, and the
#: model libraries whose modules call the user's code.
_LIBRARY_PACKAGES = ('infwidth', 'jax', 'jaxlib', 'flax', 'haiku', 'equinox')


def _library_dirs():
  dirs = [_package_dir(name) for name in _LIBRARY_PACKAGES]
  return tuple(d for d in dirs if d)


def source_location(eqn) -> Optional[str]:
  """The user's source line of an equation: the innermost frame whose file is
  not inside the installed infwidth, JAX, Flax, Haiku or Equinox packages
  (located by their modules' `__file__`, not by names in the path)."""
  tb = getattr(eqn.source_info, 'traceback', None)
  library = _library_dirs()
  for frame in getattr(tb, 'frames', ()) or ():
    name = os.path.abspath(frame.file_name)
    if name.startswith(library) or frame.file_name.startswith('<frozen'):
      continue
    return f'{frame.file_name}:{frame.line_num} ({frame.function_name})'
  return None


def _det_literal(v: Literal) -> Det:
  val = np.asarray(v.val)
  return Det(val, (None,) * val.ndim)


def _as_value(c) -> Any:
  return c if isinstance(c, (Det, A.ParamRef, A.Wide)) else Det(c, (None,) * np.ndim(c))


def interpret(jaxpr, consts: Sequence[Any], args: Sequence[Any], moments: M.Moments) -> List[Any]:
  """Evaluates `jaxpr` on abstract values; returns the abstract outputs."""

  def visit(eqn, invals, callers):
    ctx = RuleContext(eqn, moments, callers)
    try:
      return _apply(ctx, eqn, invals)
    except UnsupportedPrimitiveError as e:
      if e.primitive is None:  # raised by the domain: add this equation's context
        raise ctx.unsupported(e.reason) from None
      raise

  return walk(jaxpr, consts, args, visit, literal=_det_literal, const=_as_value)


def _apply(ctx: RuleContext, eqn, invals) -> List[Any]:
  if all(isinstance(v, Det) for v in invals):
    return fold(eqn, invals)
  handler = next((h for kind, h in registry.VALUE_HANDLERS.items()
                  if any(isinstance(v, kind) for v in invals)), None)
  if handler is not None:
    out = handler(ctx, *invals, **eqn.params)
  else:
    reg = registry.lookup(eqn.primitive)
    if reg is None or reg.rule is None:
      raise ctx.unsupported()
    _check_facts(ctx, reg, eqn, invals)
    out = reg.rule(ctx, *invals, **eqn.params)
  return out if eqn.primitive.multiple_results else [out]


def _check_facts(ctx, reg: registry.Registration, eqn, invals):
  """Refuses values and bodies the registered rule does not handle."""
  if (A.ChannelConcat not in reg.accepts
      and any(isinstance(v, A.ChannelConcat) for v in invals)):
    raise ctx.unsupported(
        'a value concatenated along its channel axis is used other than by channelwise '
        'maps or a contraction over its channel axis')
  if reg.body is not None:
    # One body (a tuple of primitives) or alternatives (a tuple of such tuples).
    options = reg.body if isinstance(reg.body[0], tuple) else (reg.body,)
    for body in sub_jaxprs(eqn):
      prims = tuple(body_primitives(body))
      if prims not in tuple(tuple(o) for o in options):
        names = ' or '.join('`' + ', '.join(str(p) for p in o) + '`' for o in options)
        raise ctx.unsupported(f'its body is not {names}')
      ctx.body = prims


def fold(eqn, invals) -> List[Det]:
  """Constant folding: evaluates an equation whose inputs are all deterministic."""
  values = [d.value for d in invals]
  if any(isinstance(v, jax.core.Tracer) for v in values):
    outs = bind(eqn, values)
  else:
    # Constants stay concrete under an enclosing jit, so rules can read them.
    with jax.ensure_compile_time_eval():
      outs = bind(eqn, values)
  roles = registry.fact(eqn.primitive, 'det_roles', default_det_roles)(eqn, invals, outs)
  return [Det(o, r, _compact(eqn, invals)) for o, r in zip(outs, roles)]


def _compact(eqn, invals):
  """The un-broadcast form of a constant-folded broadcast (see `Det.compact`)."""
  if eqn.primitive is not broadcast_in_dim_p:
    return None
  src = invals[0].compact if invals[0].compact is not None else invals[0].value
  if isinstance(src, jax.core.Tracer) and src.ndim:
    return None  # a per-input value: keep the full array
  shape = [1] * len(eqn.params['shape'])
  for i, d in enumerate(eqn.params['broadcast_dimensions']):
    shape[d] = np.shape(src)[i]
  return np.reshape(np.asarray(src), shape) if not isinstance(src, jax.core.Tracer) else src.reshape(shape)
