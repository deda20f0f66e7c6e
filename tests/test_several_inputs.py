"""Several inputs: `x1` (and `x2`) as a tuple, list or dict of arrays, each with
the batch axis first (NT's networks that start with `parallel`).

Independent inputs through separate weights add their covariances, so a
network of a dense input `a` and a flattened image `b` equals the same
network of the concatenated features `[a/√4, b/√18]` (NNGP and NTK, to
1e-12); a tuple of one input equals the bare input, also where spatial
kernels are computed on blocks of input pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth import stax
from infwidth.domain import pair_blocks

H = 256
KEY = jax.random.PRNGKey(0)
A1, A2 = jax.random.normal(KEY, (5, 4)), jax.random.normal(jax.random.PRNGKey(1), (3, 4))
B1, B2 = (jax.random.normal(jax.random.PRNGKey(2), (5, 3, 3, 2)),
          jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 2)))
UNIT = iw.ParamStats(0., 1.)
GET = ('nngp', 'ntk')


def two_inputs(p, x):
  a, b = x['a'], x['b'].reshape(x['b'].shape[0], -1)
  h = jax.nn.relu(a @ p['wa'] / 2. + b @ p['wb'] / np.sqrt(18) + 0.3 * p['bias'])
  return h @ p['o'] / np.sqrt(H)


def concatenated(p, x):
  h = jax.nn.relu(x @ p['w'] + 0.3 * p['bias'])
  return h @ p['o'] / np.sqrt(H)


def _params(shapes):
  return {k: jnp.ones(s) for k, s in shapes.items()}


def test_two_inputs_equal_the_concatenated_features():
  shapes = {'wa': (4, H), 'wb': (18, H), 'bias': (H,), 'o': (H, 8)}
  kf = iw.kernelize(two_inputs, _params(shapes), param_stats={k: UNIT for k in shapes})
  k = kf({'a': A1, 'b': B1}, {'a': A2, 'b': B2}, GET)
  same = kf({'a': A1, 'b': B1}, None, GET)

  cat = lambda a, b: jnp.concatenate([a / 2., b.reshape(b.shape[0], -1) / np.sqrt(18)], 1)
  shapes = {'w': (22, H), 'bias': (H,), 'o': (H, 8)}
  ref_fn = iw.kernelize(concatenated, _params(shapes), param_stats={k: UNIT for k in shapes})
  ref = ref_fn(cat(A1, B1), cat(A2, B2), GET)
  ref_same = ref_fn(cat(A1, B1), None, GET)
  for got, want in ((k, ref), (same, ref_same)):
    np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def _conv_gap(p, x):
  h = jax.lax.conv_general_dilated(x, p['w'], (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jax.nn.relu(h / np.sqrt(18)).mean((1, 2)) @ p['o'] / np.sqrt(64)


@pytest.mark.parametrize('blocked', [False, True])
def test_a_tuple_of_one_input_equals_the_input(monkeypatch, blocked):
  if not blocked:  # one block: all pairs at once
    monkeypatch.setattr(pair_blocks, 'TARGET_BLOCK_ENTRIES', 2 ** 40)
  x1 = jax.random.normal(KEY, (20, 5, 5, 2))
  x2 = jax.random.normal(jax.random.PRNGKey(4), (18, 5, 5, 2))
  shapes = {'w': (3, 3, 2, 64), 'o': (64, 4)}
  stats = {k: UNIT for k in shapes}
  bare = iw.kernelize(_conv_gap, _params(shapes), param_stats=stats)
  wrapped = iw.kernelize(lambda p, x: _conv_gap(p, x[0]), _params(shapes), param_stats=stats)
  for a, b in ((x1, None), (x1, x2)):
    want = bare(a, b, GET)
    got = wrapped((a,), None if b is None else (b,), GET)
    np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_stax_parallel_inputs_add_their_kernels():
  """`parallel(Dense, Dense) → FanInSum`: independent inputs, K = K_a + K_b."""
  _, apply_fn, kernel_fn = stax.serial(
      stax.parallel(stax.Dense(H, W_std=1.5, b_std=0.1), stax.Dense(H, W_std=0.5, b_std=0.2)),
      stax.FanInSum())
  b1, b2 = B1.reshape(5, -1), B2.reshape(3, -1)
  k = kernel_fn((A1, b1), (A2, b2), GET)
  want = 1.5 ** 2 * A1 @ A2.T / 4 + 0.1 ** 2 + 0.5 ** 2 * b1 @ b2.T / 18 + 0.2 ** 2
  np.testing.assert_allclose(k.nngp, want, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, want, rtol=1e-12)   # one dense layer: NTK = NNGP
  init_fn = stax.serial(stax.parallel(stax.Dense(H), stax.Dense(H)), stax.FanInSum())[0]
  out_shape, params = init_fn(KEY, ((-1, 4), (-1, 18)))
  assert tuple(out_shape)[1:] == (H,) and apply_fn(params, (A1, b1)).shape == (5, H)


def test_inputs_of_different_structures_are_refused():
  shapes = {'wa': (4, H), 'wb': (18, H), 'bias': (H,), 'o': (H, 8)}
  kf = iw.kernelize(two_inputs, _params(shapes), param_stats={k: UNIT for k in shapes})
  with pytest.raises(iw.InfwidthError, match='same shape apart from the batch axis'):
    kf({'a': A1, 'b': B1}, {'a': A2}, 'nngp')
  with pytest.raises(iw.InfwidthError, match='one batch size'):
    kf({'a': A1, 'b': B2}, None, 'nngp')
