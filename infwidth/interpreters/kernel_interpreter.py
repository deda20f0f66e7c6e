"""The kernel interpreter: walks a jaxpr, mapping each equation to a kernel rule.

Values in the environment are `Det` (deterministic arrays over the joint
batch), `ParamRef` (symbolic parameters) and `Wide` values. Equations with
only deterministic inputs are evaluated concretely (constant folding);
call-like equations (jit, custom_jvp/vjp, remat, closed_call) are inlined by
recursion on their primal sub-jaxpr; every other equation that touches a
parameter or a wide value goes to the rule registered for its primitive.
"""

from __future__ import annotations

from typing import Any, List, Sequence

import jax
import numpy as np
from jax.extend.core.primitives import broadcast_in_dim_p
from jax.extend.core import Literal

from infwidth import algebra as A
from infwidth import moments as M
from infwidth.errors import UnsupportedPrimitiveError
from infwidth.interpreters.compat import CALL_PRIMITIVES, subjaxpr_of
from infwidth.rules import registry
from infwidth.rules.reductions import ChannelSum, channel_sum_rule
from infwidth.rules.structural import det_roles
from infwidth.rules.values import Det


class RuleContext:
  """What a rule may know besides its inputs: the equation and the moment engine."""

  def __init__(self, eqn, moments: M.Moments, callers=()):
    self.eqn = eqn
    self.moments = moments
    self.callers = callers  # enclosing call equations, innermost last

  def unsupported(self, reason: str = '') -> UnsupportedPrimitiveError:
    loc = None
    for e in (self.eqn,) + tuple(reversed(self.callers)):
      loc = source_location(e)
      if loc:
        break
    return UnsupportedPrimitiveError(self.eqn.primitive, self.eqn.params, loc, reason)

  def fold(self, invals) -> Det:
    """The equation evaluated on deterministic inputs (constant folding)."""
    (out,) = _fold(self.eqn, invals)
    return out


def source_location(eqn) -> str:
  """The user's source line of an equation: the innermost frame outside JAX and infwidth."""
  tb = getattr(eqn.source_info, 'traceback', None)
  for frame in getattr(tb, 'frames', ()) or ():
    name = frame.file_name.replace('\\', '/')
    if '/jax/' in name or '/jaxlib/' in name or '/infwidth/' in name:
      continue
    if '/flax/' in name or '/haiku/' in name or '/equinox/' in name:
      continue
    return f'{frame.file_name}:{frame.line_num} ({frame.function_name})'
  return None


def _det_literal(v) -> Det:
  val = np.asarray(v.val)
  return Det(val, (None,) * val.ndim)


def interpret(jaxpr, consts: Sequence[Any], args: Sequence[Any], moments: M.Moments,
              callers=()) -> List[Any]:
  """Evaluates `jaxpr` on abstract values; returns the abstract outputs."""
  env = {}

  def read(v):
    return _det_literal(v) if isinstance(v, Literal) else env[v]

  for var, c in zip(jaxpr.constvars, consts):
    env[var] = c if isinstance(c, (Det, A.ParamRef, A.Wide)) else Det(c, (None,) * np.ndim(c))
  for var, a in zip(jaxpr.invars, args):
    env[var] = a

  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive in CALL_PRIMITIVES:
      sub, sub_consts = subjaxpr_of(eqn)
      outs = interpret(sub, sub_consts, invals[len(invals) - len(sub.invars):], moments,
                       callers + (eqn,))
    elif all(isinstance(v, Det) for v in invals):
      outs = _fold(eqn, invals)
    elif any(isinstance(v, ChannelSum) for v in invals):
      outs = [channel_sum_rule(RuleContext(eqn, moments, callers), *invals, **eqn.params)]
    else:
      rule = registry.KERNEL_RULES.get(eqn.primitive)
      if rule is None:
        raise RuleContext(eqn, moments, callers).unsupported()
      if (rule not in registry.CHANNEL_CONCAT_RULES
          and any(isinstance(v, A.ChannelConcat) for v in invals)):
        raise RuleContext(eqn, moments, callers).unsupported(
            'a value concatenated along its channel axis is used other than by channelwise '
            'maps or a contraction over its channel axis')
      outs = rule(RuleContext(eqn, moments, callers), *invals, **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def _fold(eqn, invals):
  """Constant folding: evaluates an equation whose inputs are all deterministic."""
  values = [d.value for d in invals]
  if any(isinstance(v, jax.core.Tracer) for v in values):
    outs = eqn.primitive.bind(*values, **eqn.params)
  else:
    # Constants stay concrete under an enclosing jit, so rules can read them.
    with jax.ensure_compile_time_eval():
      outs = eqn.primitive.bind(*values, **eqn.params)
  if not eqn.primitive.multiple_results:
    outs = [outs]
  roles = det_roles(eqn, invals, outs)
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
