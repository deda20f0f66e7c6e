"""`stax.repeat(layer, n)`: the same parameters at every repetition (NT's
semantics). Its kernel, through kernelize with the weights shared, equals the
kernel of `serial` with independent copies (NNGP and NTK), and Monte Carlo of
the shared-weight finite network confirms it."""

import jax
import numpy as np

import mc_check
from infwidth import stax

X = jax.random.normal(jax.random.PRNGKey(0), (4, 6))


def _block(width):
  return stax.serial(stax.Dense(width, 1.4, 0.1), stax.Erf())


def test_repeat_equals_serial_with_independent_copies():
  head = stax.Dense(64, W_std=1.2, b_std=0.1)
  rep = stax.serial(head, stax.repeat(_block(64), 3), stax.Dense(3))
  ser = stax.serial(head, *[_block(64)] * 3, stax.Dense(3))
  k_rep = rep[2](X, X[:2] + 0.3, ('nngp', 'ntk'))
  k_ser = ser[2](X, X[:2] + 0.3, ('nngp', 'ntk'))
  np.testing.assert_allclose(k_rep.nngp, k_ser.nngp, rtol=1e-10)
  np.testing.assert_allclose(k_rep.ntk, k_ser.ntk, rtol=1e-10)
  init_fn, apply_fn, _ = rep
  shape, params = init_fn(jax.random.PRNGKey(1), X.shape)
  assert shape == (4, 3) and apply_fn(params, X).shape == (4, 3)
  # One set of parameters for the three repetitions.
  assert len(jax.tree.leaves(params[1])) == len(jax.tree.leaves(_block(64)[0](
      jax.random.PRNGKey(0), (4, 64))[1]))


def test_repeat_matches_monte_carlo_with_shared_weights():
  width = 512
  init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(width, 1.2, 0.1),
                                             stax.repeat(_block(width), 3), stax.Dense(128))
  k = kernel_fn(X, None, 'nngp')
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[1])(apply_fn(p, X)))
  draws = np.stack([f(init_fn(key, X.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(2), 64)])
  mc_check.check_against_mc(k, draws, 4, width, 4.0, 2.0)


def test_repeat_ntk_matches_monte_carlo_with_shared_weights():
  """The shared weight's gradients at different depths are uncorrelated in the
  limit, so the NTK is that of independent copies; the finite network's NTK
  (two logits, structured derivatives) agrees."""
  from infwidth.empirical import NtkImplementation, empirical_ntk_fn
  width = 512
  init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(width, 1.2, 0.1),
                                             stax.repeat(_block(width), 3), stax.Dense(2))
  k = kernel_fn(X, None, 'ntk')
  ntk_fn = empirical_ntk_fn(lambda p, x: apply_fn(p, x)[:, :2],
                            implementation=NtkImplementation.STRUCTURED_DERIVATIVES)
  one = jax.jit(lambda p: ntk_fn(X, None, p))
  draws = np.stack([one(init_fn(key, X.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(2), 64)])
  mc_check.check_against_mc(k, draws, 4, width, 4.0, 2.0)
