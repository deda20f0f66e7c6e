"""Each output's private copy of its elementwise tail: same values, one fused loop each."""

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.interpreters import loop_rolling as LR
from infwidth.interpreters import output_tails as OT

jax.config.update('jax_enable_x64', True)


def _two_recursions(x):
  """An NNGP-like and an NTK-like recursion sharing every elementwise step."""
  k = x @ x.T
  v = jnp.sum(x * x, axis=1)
  t = k
  for _ in range(2):      # (three would be rolled into a scan)
    rho = k / jnp.sqrt(v[:, None] * v[None, :])
    k = jnp.cos(rho) + rho * jnp.exp(rho)
    t = k + t * jnp.sin(rho)
    v = v / 2 + 1
  return k, t, v


def _x(n=6):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, 4)))


def test_second_output_gets_a_tail_back_to_the_contractions():
  closed = jax.make_jaxpr(_two_recursions)(_x())
  tails = OT.plan_tails(closed.jaxpr)
  assert tails[0] is None                       # the first output keeps the original
  assert tails[1] is not None and tails[2] is not None
  prims = {closed.jaxpr.eqns[i].primitive.name for i in tails[1].eqns}
  assert 'dot_general' not in prims and 'reduce_sum' not in prims
  # The frontier: the Gram matrix and the row norms, nothing elementwise.
  frontier_prims = {e.primitive.name for e in closed.jaxpr.eqns
                    for v in e.outvars if v in set(tails[1].frontier)}
  assert frontier_prims == {'dot_general', 'reduce_sum'}


def test_tails_change_no_value_and_keep_derivatives():
  x = _x()
  closed = jax.make_jaxpr(_two_recursions)(x)
  want = _two_recursions(x)
  run = jax.jit(lambda a: LR.eval_rolled(closed, a, split_tails=True))
  for w, g in zip(want, run(x)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-14)
  loss = lambda f: (lambda a: sum(jnp.sum(o ** 2) for o in f(a)))
  g_want = jax.grad(loss(_two_recursions))(x)
  g_got = jax.grad(loss(lambda a: LR.eval_rolled(closed, a, split_tails=True)))(x)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-12)


def test_each_output_is_one_fused_loop():
  # Without tails XLA:CPU materialises the shared intermediates (several
  # (N, N) loops); with them each (N, N) output is one loop reading the Gram
  # matrix.
  x = _x(64)
  closed = jax.make_jaxpr(lambda a: _two_recursions(a)[:2])(x)

  def square_loops(split):
    hlo = jax.jit(lambda a: LR.eval_rolled(closed, a, split_tails=split)).lower(x)
    text = hlo.compile().as_text()
    return sum(1 for line in text.splitlines()
               if '= f64[64,64]' in line and 'kind=kLoop' in line)
  assert square_loops(True) == 2
  assert square_loops(False) > 2


def test_unneeded_equations_are_skipped():
  x = _x()
  closed = jax.make_jaxpr(_two_recursions)(x)
  tails = OT.plan_tails(closed.jaxpr)
  needed = OT.needed_equations(closed.jaxpr, tails)
  # What only the copied tails use is not evaluated a second time.
  only_in_tails = set(tails[1].eqns) - set(i for i, n in enumerate(needed) if n)
  assert only_in_tails
  assert not any(needed[i] for i in only_in_tails)
