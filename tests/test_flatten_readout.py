"""`Flatten` as the last layer, and after a one-channel convolution.

A flattened output's channels are the pairs (position, channel); its kernel
per channel is their average, `(1/S) Σ_s K(x, s; x′, s)` (NT's `Flatten`):
checked against the spatial output kernel of the same network, and against
Monte Carlo of the finite network."""

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
import mc_check
from infwidth import stax

X = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2))


def _body(channels):
  return [stax.Conv(channels, (3, 3), padding='SAME', W_std=1.3, b_std=0.2), stax.Relu()]


def test_flatten_last_is_the_average_over_positions():
  k = stax.serial(*_body(8), stax.Flatten())[2](X, None, ('nngp', 'ntk'))
  spatial = stax.serial(*_body(8))[2](X, None, ('nngp', 'ntk'), diagonal_spatial=True)
  for got, full in ((k.nngp, spatial.nngp), (k.ntk, spatial.ntk)):
    np.testing.assert_allclose(got, full.mean((-2, -1)), rtol=1e-10)
  assert k.nngp.shape == (3, 3)


def test_flatten_last_matches_monte_carlo():
  width = 256
  init_fn, apply_fn, kernel_fn = stax.serial(*_body(width), stax.Flatten())
  k = kernel_fn(X, None, 'nngp')
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[1])(apply_fn(p, X)))
  keys = jax.random.split(jax.random.PRNGKey(1), 64)
  draws = np.stack([f(init_fn(key, X.shape)[1]) for key in keys])
  mc_check.check_against_mc(k, draws, 1, width, 4.0, 2.0)


def test_flatten_after_a_one_channel_convolution():
  """The limit does not depend on the number of channels a layer is written with."""
  head = [stax.Flatten(), stax.Dense(4, 0.9, 0.1)]
  one = stax.serial(*_body(1), *head)[2](X, X[:2] * 0.5, ('nngp', 'ntk'))
  many = stax.serial(*_body(16), *head)[2](X, X[:2] * 0.5, ('nngp', 'ntk'))
  np.testing.assert_allclose(one.nngp, many.nngp, rtol=1e-12)
  np.testing.assert_allclose(one.ntk, many.ntk, rtol=1e-12)
