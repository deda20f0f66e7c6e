"""Arrays built inside the function from shapes (an RNN's initial state
`zeros((x.shape[0], H))`) carry no batch axis: they are the same for every
input. Checked on an unrolled Elman RNN against Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from test_kernelize_monte_carlo import check_against_mc, monte_carlo

N, T, D, H = 4, 3, 5, 512
X = jax.random.normal(jax.random.PRNGKey(0), (N, T, D))
SHAPES = {'wh': (H, H), 'wx': (D, H), 'b': (H,), 'o': (H, 256)}
STATS = {k: iw.ParamStats(0., 1.) for k in SHAPES}


def elman(p, x, h0=None):
  """h_t = tanh(1.2 W_h h_{t−1}/√H + W_x x_t/√D + 0.2 b), the same W_h at every step."""
  h = jnp.zeros((x.shape[0], H)) if h0 is None else h0(x)
  for t in range(x.shape[1]):
    h = jnp.tanh(h @ p['wh'] * 1.2 / np.sqrt(H) + x[:, t] @ p['wx'] / np.sqrt(D) + 0.2 * p['b'])
  return h @ p['o'] / np.sqrt(H)


def _kernel(f, x=X):
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  return iw.kernelize(f, params, param_stats=STATS)(x, None, ('nngp', 'ntk'))


def test_unrolled_rnn_with_zero_initial_state_matches_monte_carlo():
  k = _kernel(elman)
  nngp, ntk = monte_carlo(elman, SHAPES, STATS, X)
  check_against_mc(k.nngp, nngp, T, H)
  check_against_mc(k.ntk, ntk, T, H)


def test_constant_initial_states_built_in_several_ways_agree():
  ones = _kernel(lambda p, x: elman(p, x, lambda x: jnp.full((x.shape[0], H), 0.5)))
  bcast = _kernel(lambda p, x: elman(p, x, lambda x: jnp.broadcast_to(0.5, (x.shape[0], H))))
  np.testing.assert_allclose(ones.nngp, bcast.nngp, rtol=1e-12)
  assert np.abs(ones.nngp - _kernel(elman).nngp).max() > 1e-3


def test_an_array_varying_along_the_batch_size_is_refused_with_the_line():
  varying = lambda x: jnp.arange(x.shape[0], dtype=x.dtype)[:, None] * jnp.ones((1, H))
  with pytest.raises(iw.UnsupportedPrimitiveError, match='(?s)batch axis.*test_arrays_built_inside'):
    _kernel(lambda p, x: elman(p, x, varying))
