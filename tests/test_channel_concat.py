"""Concatenation along the channel axis: each block of channels keeps its own
kernel, so a contraction over the channels sees the channel-weighted average.

The blocks may be inputs: `concatenate([x, h]) @ W` (Haiku's `hk.LSTM`) sums
an input block and a wide block, `Σ_c W_c v_c` with second moment
`var·(x·x′ + H·E[h h′])` (docs/semantics.md, "Inputs concatenated with wide
values"). Parameters concatenated along an output axis (Flax's
`OptimizedLSTMCell`) stay their own leaves: the contraction is the
concatenation of the pieces' results, split again at the pieces.
"""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import erf

import infwidth as iw
from test_kernelize_monte_carlo import check_against_mc, monte_carlo

X1 = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
X2 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
SHAPES = dict(w0=(3, 8), wa=(8, 6), wb=(8, 2), r_both=(8, 1), r_a=(6, 1), r_b=(2, 1))
STATS = {k: iw.ParamStats(0., 1.) for k in SHAPES}


def net(p, x, branches=('a', 'b')):
  """A shared layer, then ReLU (6 channels) and erf (2 channels) branches."""
  h = x @ p['w0'] / np.sqrt(3) + 0.1
  outs = {'a': jax.nn.relu(h @ p['wa'] / np.sqrt(8)), 'b': erf(h @ p['wb'] / np.sqrt(8))}
  z = jnp.concatenate([outs[b] for b in branches], -1) if len(branches) > 1 else outs[branches[0]]
  z = 1.5 * z - 0.2  # a channelwise map of the concatenation
  r = p['r_both'] if len(branches) > 1 else p['r_' + branches[0]]
  return z @ r / np.sqrt(z.shape[-1])


def kernel_fn(dtype, branches=('a', 'b')):
  params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SHAPES.items()}
  return iw.kernelize(lambda p, x: net(p, x, branches), params, param_stats=STATS)


@pytest.mark.parametrize('dtype', [jnp.float64, jnp.float32])
@pytest.mark.parametrize('x2', [None, X2])
def test_kernel_is_the_channel_weighted_average_of_the_branches(dtype, x2):
  x1 = X1.astype(dtype)
  x2 = None if x2 is None else x2.astype(dtype)
  k = kernel_fn(dtype)(x1, x2, ('nngp', 'ntk'))
  ka = kernel_fn(dtype, ('a',))(x1, x2, ('nngp', 'ntk'))
  kb = kernel_fn(dtype, ('b',))(x1, x2, ('nngp', 'ntk'))
  tol = 1e-12 if dtype == jnp.float64 else 2e-6
  for g in ('nngp', 'ntk'):
    want = 0.75 * getattr(ka, g) + 0.25 * getattr(kb, g)
    np.testing.assert_allclose(getattr(k, g), want, rtol=tol, atol=tol)
    # The branches' kernels differ, so the weights are tested.
    assert np.abs(getattr(ka, g) - getattr(kb, g)).max() > 0.05


def branch(p, x, which):
  h = x @ p['w0'] / np.sqrt(3)
  return {'a': jax.nn.relu, 'b': erf}[which](h @ p['w' + which] / np.sqrt(8))


def test_nested_and_jitted_concatenation():
  """Blocks of 6, 2 and 2 channels (the erf branch twice): weights 0.6, 0.4."""
  def nested(p, x):
    a, b = branch(p, x, 'a'), branch(p, x, 'b')
    z = jnp.concatenate([jnp.concatenate([a, b], -1), b], -1)
    return z @ p['r10'] / np.sqrt(10)

  def single(which):
    f = lambda p, x: branch(p, x, which) @ p['r_' + which] / np.sqrt(SHAPES['r_' + which][0])
    return iw.kernelize(f, params, param_stats=stats)(X1, None, 'nngp')

  shapes = dict(SHAPES, r10=(10, 1))
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in shapes.items()}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  kf = jax.jit(iw.kernelize(nested, params, param_stats=stats), static_argnames='get')
  np.testing.assert_allclose(kf(X1, None, 'nngp'), 0.6 * single('a') + 0.4 * single('b'),
                             rtol=1e-12)


@pytest.mark.parametrize('use', ['residual_with_one_branch'])
def test_unsupported_uses_are_reported(use):
  def f(p, x):
    h = x @ p['w0'] / np.sqrt(3)
    z = jnp.concatenate([branch(p, x, 'a'), branch(p, x, 'b')], -1)
    z = z + h
    return z @ p['r_both'] / np.sqrt(8)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in SHAPES.items()}
  with pytest.raises(iw.UnsupportedPrimitiveError, match='concatenated along its channel axis'):
    iw.kernelize(f, params, param_stats=STATS)(X1)


def test_concatenated_output_gets_the_channel_average():
  """An output concatenated along channels has no single per-channel kernel:
  kernel_fn returns the average over its channels."""
  params = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in SHAPES.items()}
  both = lambda p, x: jnp.concatenate([branch(p, x, 'a'), branch(p, x, 'b')], -1)
  k = iw.kernelize(both, params, param_stats=STATS)(X1, X2, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    ka, kb = (iw.kernelize(lambda p, x: branch(p, x, w), params, param_stats=STATS)(X1, X2, g)
              for w in 'ab')
    np.testing.assert_allclose(getattr(k, g), 0.75 * ka + 0.25 * kb, rtol=1e-12)


def _mc_nngp(layer, x, width, n_draws=64):
  """NNGP of a stax network against the mean of per-draw `f fᵀ / C`."""
  import mc_check
  init_fn, apply_fn, kernel_fn = layer
  k = kernel_fn(x, None, 'nngp')
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[-1])(apply_fn(p, x)))
  draws = np.stack([f(init_fn(key, x.shape)[1])
                    for key in jax.random.split(jax.random.PRNGKey(0), n_draws)])
  mc_check.check_against_mc(k, draws, 2, width, 4.0, 2.0, per_entry=False)


@pytest.mark.parametrize('head', [pytest.param('GlobalAvgPool', marks=pytest.mark.slow),
                                  pytest.param('AvgPool', marks=pytest.mark.slow),
                                  pytest.param('Flatten', marks=pytest.mark.slow),
                                  'LayerNorm'])
def test_maps_of_concatenated_convolutions_match_monte_carlo(head):
  """Pooling, flattening and normalising over the channels act on each block
  (statistics over the channels average the blocks by their channel counts)."""
  from infwidth import stax
  width = 256
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 5, 2))
  tail = {'GlobalAvgPool': [stax.GlobalAvgPool()],
          'AvgPool': [stax.AvgPool((2, 2)), stax.Flatten()],
          'Flatten': [stax.Flatten()],
          'LayerNorm': [stax.LayerNorm(), stax.Relu(), stax.GlobalAvgPool()]}[head]
  layer = stax.serial(
      stax.FanOut(2),
      stax.parallel(stax.serial(stax.Conv(width, (3, 3), W_std=1.3, b_std=0.2, padding='SAME'),
                                stax.Relu()),
                    stax.serial(stax.Conv(width // 2, (1, 1), W_std=1.1, b_std=0.3), stax.Erf())),
      stax.FanInConcat(), *tail, stax.Dense(128, 0.9, 0.1))
  _mc_nngp(layer, x, width)


# ----------------------------------------------------------------------------
# Inputs beside wide channels.


GET = ('nngp', 'ntk')
N, D = 4, 4
X = jax.random.normal(jax.random.PRNGKey(0), (N, D))


def _arccos(k):
  """`E[relu(u) relu(u′)]` and `E[relu′ relu′]` for a centred Gaussian of covariance `k`."""
  norm = np.sqrt(np.outer(np.diag(k), np.diag(k)))
  cos = np.clip(k / norm, -1, 1)
  np.fill_diagonal(cos, 1.0)
  theta = np.arccos(cos)
  return (norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi),
          (np.pi - theta) / (2 * np.pi))


def skip_net(width):
  def f(p, x):
    h = jax.nn.relu(x @ p['w1'] / np.sqrt(D))
    return jnp.concatenate([x, h], -1) @ p['w2'] / np.sqrt(D + width)
  return f


def skip_shapes(width, c=256):
  return {'w1': (D, width), 'w2': (D + width, c)}


UNIT = {'w1': iw.ParamStats(0., 1.), 'w2': iw.ParamStats(0., 1.)}


def _kernel(f, shapes, stats, x=X, dtype=jnp.float64):
  params = jax.tree.map(lambda s: jnp.ones(s, dtype), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  return iw.kernelize(f, params, param_stats=stats)(x.astype(dtype), None, GET)


def _closed_form(x, width):
  x = np.asarray(x, np.float64)
  lin = x @ x.T
  t, tdot = _arccos(lin / D)
  nngp = (lin + width * t) / (D + width)
  ntk = nngp + width * tdot * lin / D / (D + width)
  return nngp, ntk


@pytest.mark.parametrize('dtype, rtol', [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_input_beside_hidden_units_is_the_size_weighted_average(dtype, rtol):
  """`[x, relu(x W1/√D)] W2/√(D+H)`: `(x·x′ + H·E[relu relu])/(D + H)`."""
  width = 48
  k = _kernel(skip_net(width), skip_shapes(width), UNIT, dtype=dtype)
  assert k.nngp.dtype == dtype
  nngp, ntk = _closed_form(X.astype(dtype), width)
  np.testing.assert_allclose(k.nngp, nngp, rtol=rtol, atol=rtol * 1e-2)
  np.testing.assert_allclose(k.ntk, ntk, rtol=rtol, atol=rtol * 1e-2)


def test_input_beside_hidden_units_matches_monte_carlo():
  width = 512
  shapes = skip_shapes(width)
  f = skip_net(width)
  k = _kernel(f, shapes, UNIT)
  nngp, ntk = monte_carlo(f, shapes, UNIT, X)
  check_against_mc(k.nngp, nngp, 1, width)
  check_against_mc(k.ntk, ntk, 1, width)


def test_is_gaussian_of_an_input_beside_wide_channels():
  """NT's `is_gaussian`: the input block counts as Gaussian (no variance)."""
  shapes = {'w1': (D, 8)}

  def with_linear(p, x):
    return jnp.concatenate([x, x @ p['w1']], -1)

  def with_relu(p, x):
    return jnp.concatenate([x, jax.nn.relu(x @ p['w1'])], -1)

  assert iw.kernelize(with_linear, shapes_to_params(shapes), param_stats={'w1': UNIT['w1']})(
      X, None, None).is_gaussian
  assert not iw.kernelize(with_relu, shapes_to_params(shapes), param_stats={'w1': UNIT['w1']})(
      X, None, None).is_gaussian


def shapes_to_params(shapes):
  return jax.tree.map(jnp.ones, shapes, is_leaf=lambda s: isinstance(s, tuple))


def test_channelwise_map_of_the_input_block_is_deterministic():
  """`tanh([x, h])` applies tanh to the array: `(Σ tanh(x)tanh(x′) + H·E[…])/(D+H)`."""
  width = 32

  def f(p, x):
    h = x @ p['w1'] / np.sqrt(D)
    return jnp.tanh(jnp.concatenate([x, h], -1)) @ p['w2'] / np.sqrt(D + width)

  def separate(p, x):
    h = x @ p['w1'] / np.sqrt(D)
    return (jnp.tanh(x) @ p['w2'][:D] + jnp.tanh(h) @ p['w2'][D:]) / np.sqrt(D + width)

  shapes = skip_shapes(width, 8)
  a, b = _kernel(f, shapes, UNIT), _kernel(separate, shapes, UNIT)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)


def test_layernorm_over_input_and_hidden_units():
  """LayerNorm over `[x, relu(h)]`: the statistics average the input's
  entries and the hidden units' moments by the blocks' sizes; closed form."""
  width = 32

  def ln(v):
    m = v.mean(-1, keepdims=True)
    return (v - m) / jnp.sqrt(((v - m) ** 2).mean(-1, keepdims=True) + 1e-5)

  def f(p, x):
    h = jax.nn.relu(x @ p['w1'] / np.sqrt(D))
    return ln(jnp.concatenate([x, h], -1)) @ p['w2'] / np.sqrt(D + width)

  k = _kernel(f, skip_shapes(width, 8), UNIT)
  x = np.asarray(X, np.float64)
  t, _ = _arccos(x @ x.T / D)
  e = np.sqrt(np.sum(x ** 2, 1) / D / (2 * np.pi))            # E[relu(u)]
  m = (x.sum(1) + width * e) / (D + width)
  var = (np.sum(x ** 2, 1) + width * np.diag(t)) / (D + width) - m ** 2
  xc = x - m[:, None]
  cov = xc @ xc.T + width * (t - np.outer(m, e) - np.outer(e, m) + np.outer(m, m))
  want = cov / np.sqrt(np.outer(var + 1e-5, var + 1e-5)) / (D + width)
  np.testing.assert_allclose(k.nngp, want, rtol=1e-10)


def test_convolution_over_an_image_and_feature_maps_equals_split_filters():
  """`conv([x, relu(conv(x))])` equals the two convolutions with the filter
  split into its input-channel blocks (spatial blocks included)."""
  from jax import lax
  c, width = 3, 16
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, c))
  shapes = {'k1': (3, 3, c, width), 'k2': (3, 3, c + width, 4)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}

  def conv(y, k):
    return lax.conv_general_dilated(y, k, (1, 1), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def whole(p, x):
    h = jax.nn.relu(conv(x, p['k1']))
    return conv(jnp.concatenate([x, h], -1), p['k2']).mean((1, 2))

  def split(p, x):
    h = jax.nn.relu(conv(x, p['k1']))
    return (conv(x, p['k2'][:, :, :c]) + conv(h, p['k2'][:, :, c:])).mean((1, 2))

  a, b = _kernel(whole, shapes, stats, x), _kernel(split, shapes, stats, x)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)


def test_stax_fan_in_concat_of_the_input_is_nts_width_weighted_average():
  """NT's `FanInConcat` of an `Identity` branch (the input, `D` channels) and
  a dense branch (64) averages their kernels weighted by the widths."""
  from infwidth import stax
  _, _, kf = stax.serial(
      stax.FanOut(2), stax.parallel(stax.Identity(), stax.serial(stax.Dense(64, 1.5),
                                                                 stax.Relu())),
      stax.FanInConcat(), stax.Dense(1, 1.0, 0.0))
  x = np.asarray(X, np.float64)
  t, _ = _arccos(2.25 * x @ x.T / D)
  np.testing.assert_allclose(kf(X, None, 'nngp'), (x @ x.T + 64 * t) / (D + 64), rtol=1e-10)


# ----------------------------------------------------------------------------
# Haiku's LSTM: [x_t, h] @ W.

T, H = 2, 64


def _haiku_lstm(x):
  core = hk.LSTM(H)
  out, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
  return hk.Linear(1)(out[-1])


def _plain_lstm(p, x):
  """The same network, the weight split into its input rows and hidden rows."""
  w, b = p['lstm/linear']['w'], p['lstm/linear']['b']
  h = c = jnp.zeros((x.shape[0], H), x.dtype)
  for t in range(x.shape[1]):
    gated = x[:, t] @ w[:D] + h @ w[D:] + b
    i, g, f, o = jnp.split(gated, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return h @ p['linear']['w'] + p['linear']['b']


@pytest.mark.parametrize('dtype, rtol', [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_haiku_lstm_equals_the_split_weight_network(dtype, rtol):
  x = 2. * jax.random.normal(jax.random.PRNGKey(1), (3, T, D), dtype)
  f = hk.without_apply_rng(hk.transform(_haiku_lstm))
  params = f.init(jax.random.PRNGKey(2), x)
  stats = {'lstm/linear': {'w': iw.ParamStats(0., 1. / (D + H)), 'b': iw.ParamStats(0., 0.05)},
           'linear': {'w': iw.ParamStats(0., 1. / H), 'b': iw.ParamStats(0., 0.01)}}
  a = iw.kernelize(f.apply, params, param_stats=stats)(x, None, GET)
  b = iw.kernelize(_plain_lstm, params, param_stats=stats)(x, None, GET)
  assert a.nngp.dtype == dtype
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=rtol, atol=rtol * 1e-4)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=rtol, atol=rtol * 1e-4)
  assert np.all(np.diag(a.nngp) > 1e-3)


def test_nonzero_initial_state_beside_the_input_matches_monte_carlo():
  """Step 0 applies `W` to the array `[x_0, z]` (`z = 0.8`), step 1 to
  `[x_1, h_1]`: their covariance pairs `z` with `h_1` as `(Σ_c z_c)·E[h_1]`,
  which the sum over steps reads (without it the kernel is 3 tolerances
  off). With the weight split into its input and hidden rows, `z @ W_h`
  pairs with `h_1 @ W_h` the same way."""
  width, steps = 512, 2
  x = jax.random.normal(jax.random.PRNGKey(4), (N, steps, D))

  def rnn(p, x):
    h, total = 0.8 * jnp.ones((x.shape[0], width), x.dtype), 0.
    for t in range(steps):
      h = jnp.tanh(jnp.concatenate([x[:, t], h], -1) @ p['w'] / np.sqrt(D + width) + 0.3)
      total = total + h
    return total @ p['o'] / np.sqrt(width)

  def split(p, x):
    h, total = 0.8 * jnp.ones((x.shape[0], width), x.dtype), 0.
    for t in range(steps):
      h = jnp.tanh((x[:, t] @ p['w'][:D] + h @ p['w'][D:]) / np.sqrt(D + width) + 0.3)
      total = total + h
    return total @ p['o'] / np.sqrt(width)

  shapes = {'w': (D + width, width), 'o': (width, 256)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  k = _kernel(rnn, shapes, stats, x)
  nngp, ntk = monte_carlo(rnn, shapes, stats, x)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)
  # The same network with the weight split into its input and hidden rows.
  ks = _kernel(split, shapes, stats, x)
  np.testing.assert_allclose(ks.nngp, k.nngp, rtol=1e-10)
  np.testing.assert_allclose(ks.ntk, k.ntk, rtol=1e-10)


# ----------------------------------------------------------------------------
# Flax's OptimizedLSTMCell: kernels concatenated along their output axis.


class _Rnn(nn.Module):
  cell: type
  dtype: type = jnp.float64

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(self.cell(H, param_dtype=self.dtype, name='cell'))(x)[:, -1]
    return nn.Dense(1, param_dtype=self.dtype)(h)


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
@pytest.mark.parametrize('dtype, rtol', [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_flax_optimized_lstm_equals_lstm_cell(dtype, rtol):
  x = 2. * jax.random.normal(jax.random.PRNGKey(1), (3, 2, D), dtype)
  v = _Rnn(nn.OptimizedLSTMCell, dtype).init(jax.random.PRNGKey(2), x)
  v_plain = _Rnn(nn.LSTMCell, dtype).init(jax.random.PRNGKey(2), x)
  # Flax keeps the two cells' parameter trees compatible.
  assert (jax.tree.structure(v) == jax.tree.structure(v_plain)
          and jax.tree.map(jnp.shape, v) == jax.tree.map(jnp.shape, v_plain))
  a = iw.kernelize(_Rnn(nn.OptimizedLSTMCell, dtype).apply, v)(x, None, GET)
  b = iw.kernelize(_Rnn(nn.LSTMCell, dtype).apply, v)(x, None, GET)
  assert a.nngp.dtype == dtype
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=rtol, atol=rtol * 1e-4)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=rtol, atol=rtol * 1e-4)
  assert np.all(np.diag(a.nngp) > 1e-3)


def test_concatenated_parameters_used_whole_are_exact():
  """`relu(x @ [W_a, W_b]) @ V` with pieces of different variances is the
  size-weighted average of the two blocks, as with two separate layers."""
  ha, hb = 24, 40
  shapes = {'wa': (D, ha), 'wb': (D, hb), 'v': (ha + hb, 8)}
  stats = {'wa': iw.ParamStats(0., 1. / D), 'wb': iw.ParamStats(0., 3. / D),
           'v': iw.ParamStats(0., 1. / (ha + hb))}

  def whole(p, x):
    return jax.nn.relu(x @ jnp.concatenate([p['wa'], p['wb']], axis=1)) @ p['v']

  def separate(p, x):
    return jax.nn.relu(x @ p['wa']) @ p['v'][:ha] + jax.nn.relu(x @ p['wb']) @ p['v'][ha:]

  a, b = _kernel(whole, shapes, stats), _kernel(separate, shapes, stats)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)
  x = np.asarray(X)
  ta, _ = _arccos(x @ x.T / D)
  tb, _ = _arccos(3 * x @ x.T / D)
  np.testing.assert_allclose(a.nngp, (ha * ta + hb * tb) / (ha + hb), rtol=1e-10)


def test_stacked_input_rows_equal_separate_weights_in_a_recurrence():
  """`[x_t, h] @ concatenate([W_x, W_h], 0)`: the sum of the pieces'
  contractions with the input's blocks, the same weights at every step."""
  width, steps = 32, 2
  x = jax.random.normal(jax.random.PRNGKey(5), (N, steps, D))
  shapes = {'wx': (D, width), 'wh': (width, width), 'o': (width, 4)}
  stats = {'wx': iw.ParamStats(0., 1. / D), 'wh': iw.ParamStats(0., 2. / width),
           'o': iw.ParamStats(0., 1. / width)}

  def stacked(p, x):
    h = jnp.zeros((x.shape[0], width), x.dtype)
    for t in range(steps):
      h = jnp.tanh(jnp.concatenate([x[:, t], h], -1) @ jnp.concatenate([p['wx'], p['wh']], 0))
    return h @ p['o']

  def separate(p, x):
    h = jnp.zeros((x.shape[0], width), x.dtype)
    for t in range(steps):
      h = jnp.tanh(x[:, t] @ p['wx'] + h @ p['wh'])
    return h @ p['o']

  a, b = _kernel(stacked, shapes, stats, x), _kernel(separate, shapes, stats, x)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)
  assert np.all(np.diag(a.nngp) > 0.05)


def test_concatenated_bias_on_an_unsplit_value_is_refused():
  """A concatenated bias added to a value that is not concatenated from the
  same blocks would mix pieces of different moments: refused."""
  shapes = {'w': (D, 16), 'ba': (8,), 'bb': (8,), 'v': (16, 4)}
  stats = {'w': iw.ParamStats(0., 1. / D), 'ba': iw.ParamStats(0., 1.),
           'bb': iw.ParamStats(0., 4.), 'v': iw.ParamStats(0., 1. / 16)}

  def f(p, x):
    return jax.nn.relu(x @ p['w'] + jnp.concatenate([p['ba'], p['bb']])) @ p['v']

  with pytest.raises(iw.UnsupportedPrimitiveError, match='concatenated'):
    _kernel(f, shapes, stats)


@pytest.mark.parametrize('where', ['result', 'parameters'])
def test_a_slice_across_concatenated_parameters_is_refused(where):
  """Columns 6..9 straddle two pieces of different leaves: refused, whether
  the slice is of the contraction or of the concatenated parameters."""
  shapes = {'wa': (D, 8), 'wb': (D, 8), 'v': (4, 2)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}

  def f(p, x):
    w = jnp.concatenate([p['wa'], p['wb']], axis=1)
    y = (x @ w)[:, 6:10] if where == 'result' else x @ w[:, 6:10]
    return y @ p['v']

  with pytest.raises(iw.UnsupportedPrimitiveError,
                     match='not a union of its blocks' if where == 'result' else 'whole pieces'):
    _kernel(f, shapes, stats)
