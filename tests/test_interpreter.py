"""The one jaxpr walker, tested with toy visitors and a toy rule registry.

Independent of the real kernel rules: a toy visitor evaluates equations
concretely (so the walk must equal running the function), another records
which primitives it is shown (so inlining is visible), and the kernel
interpreter is run with a one-rule registry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import primitives as P

from infwidth.domain import moments as M
from infwidth.domain.errors import InternalError, UnsupportedPrimitiveError
from infwidth.domain.values import Det
from infwidth.interpreters import kernel_interpreter, walker
from infwidth.interpreters.compat import CALL_PRIMITIVES
from infwidth.rules import registry


@jax.custom_jvp
def _softplus_jvp(x):
  return jnp.log1p(jnp.exp(x))


_softplus_jvp.defjvp(lambda primals, tangents: (
    _softplus_jvp(primals[0]), jax.nn.sigmoid(primals[0]) * tangents[0]))


@jax.custom_vjp
def _cube_vjp(x):
  return x ** 3


_cube_vjp.defvjp(lambda x: (x ** 3, x), lambda x, g: (3 * x ** 2 * g,))

CONST = np.array([0.5, -1.0, 2.0])


def nested(params, x):
  """Every kind of call the walker inlines, a literal, a closed-over constant
  and a pytree of inputs and outputs."""
  w, (b,) = params['w'], params['b']
  h = jax.jit(lambda a: a @ w)(x) + b
  h = _softplus_jvp(h)
  h = jax.checkpoint(lambda a: jnp.sin(a) * 2.0)(h)
  h = _cube_vjp(h) + CONST
  h = jax.named_call(lambda a: a - 1.0, name='shift')(h)
  return {'out': h, 'sum': jnp.sum(h, axis=-1)}


PARAMS = {'w': jnp.arange(6.0).reshape(2, 3) / 7, 'b': (jnp.array([0.1, 0.2, 0.3]),)}
X = jnp.array([[0.3, -0.2], [1.0, 0.5]])


def _flat(fn, *args):
  leaves, tree = jax.tree_util.tree_flatten(args)
  flat_fn = lambda *ls: jax.tree_util.tree_leaves(fn(*jax.tree_util.tree_unflatten(tree, ls)))
  return walker.trace(flat_fn, *leaves), leaves


def test_concrete_walk_equals_the_function():
  closed, leaves = _flat(nested, PARAMS, X)
  seen = []

  def visit(eqn, invals, callers):
    seen.append(eqn.primitive)
    return walker.bind(eqn, invals)

  outs = walker.walk(closed.jaxpr, closed.consts, leaves, visit)
  want = jax.tree_util.tree_leaves(nested(PARAMS, X))
  for o, w in zip(outs, want):
    np.testing.assert_allclose(o, w, rtol=1e-6)
  # Calls are entered, never shown to the visitor.
  assert not set(seen) & set(CALL_PRIMITIVES)
  for prim in (P.dot_general_p, P.log1p_p, P.exp_p, P.sin_p, P.integer_pow_p):
    assert prim in seen


def test_calls_are_kept_unless_inlined():
  closed, leaves = _flat(nested, PARAMS, X)
  top = [e.primitive for e in walker.equations(closed.jaxpr, recursive=False)]
  assert set(top) & set(CALL_PRIMITIVES)      # the trace does hold calls
  outs = walker.evaluate(closed, *leaves)     # evaluated with the calls bound
  for o, w in zip(outs, jax.tree_util.tree_leaves(nested(PARAMS, X))):
    np.testing.assert_allclose(o, w, rtol=1e-6)
  inner = [e.primitive for e in walker.equations(closed.jaxpr)]
  assert P.sin_p in inner and P.sin_p not in top


def test_literals_and_constants_go_through_their_hooks():
  closed, leaves = _flat(nested, PARAMS, X)
  tagged = []

  def visit(eqn, invals, callers):
    tagged.extend(v for v in invals if isinstance(v, tuple))
    return walker.bind(eqn, [v[1] if isinstance(v, tuple) else v for v in invals])

  walker.walk(closed.jaxpr, closed.consts, leaves, visit,
              literal=lambda v: ('literal', v.val), const=lambda c: ('const', c))
  kinds = {t[0] for t in tagged}
  assert kinds == {'literal', 'const'}
  assert any(t[0] == 'const' and np.array_equal(t[1], CONST) for t in tagged)
  assert any(t[0] == 'literal' and t[1] == 2.0 for t in tagged)


def test_callers_name_the_enclosing_calls():
  closed, leaves = _flat(nested, PARAMS, X)
  depth = {}

  def visit(eqn, invals, callers):
    depth.setdefault(eqn.primitive, len(callers))
    return walker.bind(eqn, invals)

  walker.walk(closed.jaxpr, closed.consts, leaves, visit)
  assert depth[P.dot_general_p] == 1         # inside the jit
  assert depth[P.sin_p] >= 1                 # inside the remat


def test_wrong_number_of_outputs_is_an_internal_error():
  closed = walker.trace(lambda x: jnp.sin(x), 1.0)
  with pytest.raises(InternalError, match='sin'):
    walker.walk(closed.jaxpr, closed.consts, [1.0], lambda eqn, ins, c: [])
  with pytest.raises(InternalError, match='arguments'):
    walker.walk(closed.jaxpr, closed.consts, [1.0, 2.0], lambda eqn, ins, c: [0.0])


def test_body_primitives_of_a_window_sum():
  closed = walker.trace(
      lambda x: jax.lax.reduce_window(x, 0.0, jnp.add, (2,), (1,), 'VALID'), jnp.ones(4))
  (eqn,) = [e for e in walker.equations(closed.jaxpr)
            if e.primitive in (P.reduce_window_sum_p, P.reduce_window_p)]
  bodies = list(walker.sub_jaxprs(eqn))
  if eqn.primitive is P.reduce_window_sum_p:
    assert bodies == []
  else:
    assert [walker.body_primitives(b) for b in bodies] == [[P.add_p]]


# ----------------------------------------------------------------------------
# The kernel interpreter with a toy registry.


class Toy:
  """A toy abstract value: not deterministic, so equations on it go to rules."""

  def __init__(self, v):
    self.v = np.asarray(v)


@pytest.fixture
def toy_registry(monkeypatch):
  """A registry that knows one primitive, `sin`, as a toy rule on `Toy`s."""
  calls = []

  def toy_sin(ctx, x, **params):
    calls.append(ctx.eqn.primitive)
    return Toy(np.sin(x.v))

  for name in ('REGISTRY', 'KERNEL_RULES', 'VALUE_HANDLERS'):
    monkeypatch.setattr(registry, name, {})
  registry.register(P.sin_p, family='elementwise')(toy_sin)
  return calls


def _moments():
  return M.Moments(1, 1, True, jnp.float64)


def _interpret(fn, *args):
  closed = walker.trace(fn, *(jnp.ones(np.shape(a.v if isinstance(a, Toy) else a.value))
                              for a in args))
  return kernel_interpreter.interpret(closed.jaxpr, closed.consts, list(args), _moments())


def test_kernel_interpreter_dispatches_through_the_registry(toy_registry):
  x = Toy([0.1, 0.2, 0.3])
  (out,) = _interpret(jax.jit(lambda x: jnp.sin(x)), x)
  np.testing.assert_allclose(out.v, np.sin(x.v))
  assert toy_registry == [P.sin_p]


def test_unknown_primitive_names_it_and_the_line(toy_registry):
  def fn(x):
    return jnp.sin(x) * 2.0          # `mul` has no rule in the toy registry

  with pytest.raises(UnsupportedPrimitiveError) as info:
    _interpret(fn, Toy([0.1, 0.2, 0.3]))
  assert info.value.primitive is P.mul_p
  assert 'test_interpreter.py' in info.value.source and '.fn)' in info.value.source
  assert toy_registry == [P.sin_p]


def test_deterministic_equations_are_folded_not_dispatched(toy_registry):
  x = Det(np.array([0.1, 0.2, 0.3]), (None,))
  (out,) = _interpret(lambda x: jnp.sin(x) + 1.0, x)
  np.testing.assert_allclose(out.value, np.sin(x.value) + 1.0)
  assert toy_registry == []          # the rule was never called


def test_domain_errors_get_the_equation_context(toy_registry):
  from infwidth.domain.errors import UnsupportedValueError

  def refusing(ctx, x, **params):
    raise UnsupportedValueError('toy values have no limit')

  def fn(x):
    return jnp.cos(x)

  registry.register(P.cos_p, family='elementwise')(refusing)
  with pytest.raises(UnsupportedPrimitiveError) as info:
    _interpret(fn, Toy([0.1, 0.2, 0.3]))
  assert info.value.primitive is P.cos_p
  assert 'toy values have no limit' in str(info.value)
  assert 'test_interpreter.py' in info.value.source


def test_chain_binary_params_match_lax():
  """The add/mul nodes the interpreter builds bind like `lax.add`/`lax.mul`
  (their transposes need the same parameters), so chains differentiate."""
  from infwidth.domain.chain import BINARY, ChainBuilder, U
  for name, fn in (('add', jax.lax.add), ('mul', jax.lax.mul)):
    eqn = jax.make_jaxpr(fn)(jnp.ones(2), jnp.ones(2)).jaxpr.eqns[0]
    prim, params = BINARY[name]
    assert eqn.primitive is prim and dict(eqn.params) == params
  b = ChainBuilder()
  chain = b.build(b.binary('mul', U, b.binary('add', U, U)))
  np.testing.assert_allclose(jax.grad(lambda u: chain(u))(1.5), 6.0)
