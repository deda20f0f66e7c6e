"""Errors raised by infwidth (defined here, below every other module).

* `InfwidthError`: bad input; the message says how to fix it.
* `UnsupportedPrimitiveError`: no analytic infinite-width rule exists for a
  primitive, or for the values it meets (a product of two independent
  Gaussians, an axis that cannot be told apart). `kernelize(...,
  fallback=...)` catches exactly this type. The domain raises it without a
  primitive (`UnsupportedValueError`); the interpreter adds the equation's
  primitive and the user's source line.
* `InternalError`: an invariant of infwidth failed (a bug, never the user's).
"""

from __future__ import annotations

from typing import Any, Optional


class InfwidthError(ValueError):
  """Bad input or an unsupported construct; the message says how to fix it."""


class UnsupportedPrimitiveError(InfwidthError):
  """Something the function does has no infinite-width kernel rule.

  Attributes:
    primitive: the JAX primitive (None when the moment engine found the
      problem outside any one equation).
    params: its parameters.
    source: the user's source line that produced it, when known.
    reason: what exactly has no rule.
  """

  def __init__(self, primitive: Any = None, params: Optional[dict] = None,
               source: Optional[str] = None, reason: str = ''):
    self.primitive = primitive
    self.params = dict(params or {})
    self.source = source
    self.reason = reason
    shown = {k: v for k, v in self.params.items() if not hasattr(v, 'jaxpr') and k != 'jaxpr'}
    if primitive is None:
      head = f'no infinite-width kernel rule: {reason}.\n'
    else:
      head = (f'no infinite-width kernel rule for primitive `{primitive}`'
              + (f' ({reason})' if reason else '') + '.\n'
              f'  parameters: {shown}\n')
    msg = (head + f'  at: {source or "unknown location"}\n'
           '  Options: pass fallback="monte_carlo" (Monte Carlo over finite networks '
           'with the same parameter moments) or fallback="empirical" (the empirical '
           'kernels at the given parameters) to kernelize, or register a rule with '
           'infwidth.rules.register.')
    super().__init__(msg)


class UnsupportedValueError(UnsupportedPrimitiveError):
  """Raised by the domain and the rules: the values met have no rule.

  `UnsupportedValueError(reason)`; the interpreter re-raises it with the
  equation's primitive and source line.
  """

  def __init__(self, reason: str = '', primitive: Any = None, params: Optional[dict] = None,
               source: Optional[str] = None):
    super().__init__(primitive, params, source, reason)

  def __reduce__(self):
    return (type(self), (self.reason, self.primitive, self.params, self.source))


class InternalError(RuntimeError):
  """An invariant of infwidth failed: please report it with the model that caused it."""
