"""The registry: one `Registration` per primitive, with its rule and its facts.

A kernel rule is called as `rule(ctx, *invals, **params)` and returns the
output value (a list for multi-output primitives). Input values are `Det`
(deterministic arrays with axis roles), `ParamRef` (symbolic parameter views)
or `Wide` values (see `infwidth.domain.values`). Rules ignore parameters they
do not need, and raise `ctx.unsupported(reason)` (or the domain's
`UnsupportedValueError`) where no analytic rule exists.

The facts kept beside the rule:

* `family`: 'linear', 'elementwise', 'structural', 'spatial', 'reduction'.
* `accepts`: value kinds beyond `Det`, `ParamRef` and `Wide` that the rule
  handles itself (`ChannelConcat`); the interpreter reports any other use.
* `body`: for a primitive with a body jaxpr (a generic `reduce_window`), the
  primitives the body must consist of for the rule to apply, or a tuple of
  such alternatives; the interpreter puts the matched one in `ctx.body`.
* `det_roles(eqn, invals, outs)`: where the axis roles of deterministic
  operands go in a constant-folded equation (which axis is the batch).
* `structured`: the primitive's part in the structured-derivative empirical
  NTK (`infwidth.empirical.structured`): a parameter use whose Jacobian is
  contracted without being built ('dot', 'conv' for a filter, 'gather' for
  an embedding table), 'permutation' (moves entries: `L Lᵀ = I`) or 'scale'
  (multiplies by a scalar).
* `requirement(eqn, out_need) -> Need`: what of its operands' moments the
  primitive needs when its output needs `out_need` (`infwidth.domain.needs`;
  default: the same). A map that mixes positions (pooling) needs full blocks.
* `form`, `kinks` (elementwise primitives): its closed-form rule for Gaussian
  expectations (`infwidth.domain.closed_forms.FORM_RULES`) and where it puts
  kinks for quadrature (`infwidth.domain.quadrature.KINK_RULES`); the
  registration fills those tables.

Family helpers (`defelementwise`, `defstructural`, …) register a family in
one line each. Adding a primitive is a rule, a registration and a row in
`tests/test_rules.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

#: A rule: `rule(ctx, *invals, **params) -> value` (a list if multi-output).
Rule = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Registration:
  """Everything infwidth knows about one primitive."""
  primitive: Any
  rule: Optional[Rule] = None
  family: str = ''
  accepts: Tuple[type, ...] = ()
  body: Optional[Tuple[Any, ...]] = None
  det_roles: Optional[Callable] = None
  structured: Optional[str] = None
  form: Optional[Callable] = None
  kinks: Optional[Callable] = None
  requirement: Optional[Callable] = None


#: Every primitive infwidth knows, keyed by the primitive object.
REGISTRY: Dict[Any, Registration] = {}
#: The kernel rules alone (the registrations with a rule), kept in step.
KERNEL_RULES: Dict[Any, Rule] = {}
#: Handlers for value kinds that carry their own semantics whatever the
#: primitive (`ChannelSum`): `kind -> handler(ctx, *invals, **params)`.
VALUE_HANDLERS: Dict[type, Rule] = {}


def register_primitive(prim, rule: Optional[Rule] = None, **facts) -> Registration:
  """Registers (or completes) the registration of `prim`; returns it.

  A second call for the same primitive may only add facts it did not have.
  """
  old = REGISTRY.get(prim)
  if old is not None:
    clash = [k for k, v in facts.items() if getattr(old, k) not in (None, (), '', v)]
    if (rule is not None and old.rule is not None and old.rule is not rule) or clash:
      raise ValueError(f'{prim} is registered twice with different facts: {clash or "rule"}')
    merged = {k: v for k, v in facts.items() if v not in (None, (), '')}
    reg = dataclasses.replace(old, rule=rule or old.rule, **merged)
  else:
    reg = Registration(prim, rule, **facts)
  REGISTRY[prim] = reg
  if reg.rule is not None:
    KERNEL_RULES[prim] = reg.rule
  return reg


def register(*prims, family: str = '', accepts: Tuple[type, ...] = (),
             body: Optional[Tuple[Any, ...]] = None, det_roles: Optional[Callable] = None,
             structured: Optional[str] = None, form: Optional[Callable] = None,
             kinks: Optional[Callable] = None, requirement: Optional[Callable] = None):
  """Decorator: registers a kernel rule, with its facts, for one or more primitives."""
  def wrap(rule):
    for p in prims:
      register_primitive(p, rule, family=family, accepts=tuple(accepts), body=body,
                         det_roles=det_roles, structured=structured, form=form, kinks=kinks,
                         requirement=requirement)
    return rule
  return wrap


def register_value_kind(kind: type):
  """Decorator: a handler for every equation that meets a value of `kind`."""
  def wrap(handler):
    VALUE_HANDLERS[kind] = handler
    return handler
  return wrap


def lookup(prim) -> Optional[Registration]:
  return REGISTRY.get(prim)


def fact(prim, name: str, default: Any = None) -> Any:
  """One fact of a primitive's registration (`default` if unregistered or unset)."""
  reg = REGISTRY.get(prim)
  value = None if reg is None else getattr(reg, name)
  return default if value in (None, ()) else value
