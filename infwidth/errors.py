"""Errors raised by infwidth."""

from __future__ import annotations


class InfwidthError(ValueError):
  """Bad input or an unsupported construct; the message says how to fix it."""


class UnsupportedPrimitiveError(InfwidthError):
  """A primitive touches a wide value and has no infinite-width kernel rule.

  Attributes:
    primitive: the JAX primitive.
    params: its parameters.
    source: the user's source line that produced it, when known.
  """

  def __init__(self, primitive, params=None, source=None, reason=''):
    self.primitive = primitive
    self.params = dict(params or {})
    self.source = source
    shown = {k: v for k, v in self.params.items() if not hasattr(v, 'jaxpr') and k != 'jaxpr'}
    msg = (f'no infinite-width kernel rule for primitive `{primitive}`'
           + (f' ({reason})' if reason else '') + '.\n'
           f'  parameters: {shown}\n'
           f'  at: {source or "unknown location"}\n'
           '  Options: pass fallback="monte_carlo" (Monte Carlo over finite networks '
           'with the same parameter moments) or fallback="empirical" (the empirical '
           'kernels at the given parameters) to kernelize, or register a rule with '
           'infwidth.rules.register.')
    super().__init__(msg)
