"""Recurrent networks through `lax.scan`, `fori_loop` and `while_loop`.

Loops are unrolled before the kernel interpretation (the same weight at every
step is one source: `docs/semantics.md`, "Weight sharing"), so each loop form
must give exactly the kernel of the same network written as a Python loop
(the second implementation, itself checked against Monte Carlo in
`test_arrays_built_inside.py`); pooling over steps is checked against Monte
Carlo here. Flax's `nn.RNN` and Haiku's `dynamic_unroll` run unchanged.
"""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import infwidth as iw
from test_kernelize_monte_carlo import check_against_mc, monte_carlo

N, T, D, H = 3, 3, 4, 512
X = jax.random.normal(jax.random.PRNGKey(0), (N, T, D))
SHAPES = {'wh': (H, H), 'wx': (D, H), 'b': (H,), 'o': (H, 256)}
STATS = {k: iw.ParamStats(0., 1.) for k in SHAPES}
GET = ('nngp', 'ntk')


def cell(p, h, x_t):
  """Elman step: tanh(1.2 W_h h/√H + W_x x_t/√D + 0.2 b)."""
  return jnp.tanh(h @ p['wh'] * 1.2 / np.sqrt(H) + x_t @ p['wx'] / np.sqrt(D) + 0.2 * p['b'])


def readout(p, h):
  return h @ p['o'] / np.sqrt(H)


def h0(x):
  return jnp.zeros((x.shape[0], H), x.dtype)


def python_loop(p, x, reverse=False, pool=False):
  h, hs = h0(x), []
  for t in (reversed(range(T)) if reverse else range(T)):
    h = cell(p, h, x[:, t])
    hs.append(h)
  return readout(p, sum(hs) / T if pool else h)


def with_scan(p, x, reverse=False, pool=False):
  h, hs = lax.scan(lambda h, x_t: (cell(p, h, x_t),) * 2, h0(x), jnp.swapaxes(x, 0, 1),
                   reverse=reverse)
  return readout(p, hs.mean(0) if pool else h)


def with_fori(p, x):
  return readout(p, lax.fori_loop(0, x.shape[1], lambda t, h: cell(p, h, x[:, t]), h0(x)))


def with_while(p, x):
  def body(c):
    t, h = c
    return t + 1, cell(p, h, lax.dynamic_index_in_dim(x, t, 1, keepdims=False))
  return readout(p, lax.while_loop(lambda c: c[0] < x.shape[1], body, (0, h0(x)))[1])


def kernel(f, x=X, shapes=SHAPES, stats=STATS):
  params = jax.tree.map(jnp.ones, shapes, is_leaf=lambda s: isinstance(s, tuple))
  return iw.kernelize(f, params, param_stats=stats)(x, None, GET)


@pytest.fixture(scope='module')
def reference():
  return kernel(python_loop)


def assert_same(a, b):
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('loop', [with_scan, with_fori, with_while],
                         ids=['scan', 'fori_loop', 'while_loop'])
def test_loops_equal_the_python_loop(loop, reference):
  assert_same(kernel(loop), reference)


def test_reverse_scan_equals_the_reversed_python_loop():
  assert_same(kernel(lambda p, x: with_scan(p, x, reverse=True)),
              kernel(lambda p, x: python_loop(p, x, reverse=True)))


def test_pooling_over_steps_matches_monte_carlo():
  """The mean of the hidden states over steps: a sum of values of different
  steps (correlated through the shared weight and the recursion)."""
  pooled = lambda p, x: with_scan(p, x, pool=True)
  k = kernel(pooled)
  assert_same(k, kernel(lambda p, x: python_loop(p, x, pool=True)))
  nngp, ntk = monte_carlo(pooled, SHAPES, STATS, X)
  check_against_mc(k.nngp, nngp, T, H)
  check_against_mc(k.ntk, ntk, T, H)


def test_stacked_layers_scan_over_the_steps_of_the_layer_below():
  shapes = dict(SHAPES, wh2=(H, H), wx2=(H, H))
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}

  def layer(p, xs, wh, wx, scale):
    step = lambda h, x_t: (jnp.tanh(h @ wh * 1.2 / np.sqrt(H) + x_t @ wx / scale),) * 2
    return lax.scan(step, jnp.zeros((xs.shape[1], H), xs.dtype), xs)[1]

  def two_layers(p, x):
    ys = layer(p, jnp.swapaxes(x, 0, 1), p['wh'], p['wx'], np.sqrt(D))
    return readout(p, layer(p, ys, p['wh2'], p['wx2'], np.sqrt(H))[-1])

  def two_layers_python(p, x):
    h1, h2 = h0(x), h0(x)
    for t in range(T):
      h1 = jnp.tanh(h1 @ p['wh'] * 1.2 / np.sqrt(H) + x[:, t] @ p['wx'] / np.sqrt(D))
      h2 = jnp.tanh(h2 @ p['wh2'] * 1.2 / np.sqrt(H) + h1 @ p['wx2'] / np.sqrt(H))
    return readout(p, h2)

  assert_same(kernel(two_layers, shapes=shapes, stats=stats),
              kernel(two_layers_python, shapes=shapes, stats=stats))


def test_flax_rnn_equals_plain_jax():
  """`nn.RNN(nn.SimpleCell)` (a scan over time, outputs stacked and
  transposed back to batch-major), the last step and the mean over steps."""
  class Net(nn.Module):
    pool: bool

    @nn.compact
    def __call__(self, x):
      ys = nn.RNN(nn.SimpleCell(H, param_dtype=x.dtype))(x)   # (N, T, H)
      return nn.Dense(256, use_bias=False, param_dtype=x.dtype)(
          ys.mean(1) if self.pool else ys[:, -1])

  def plain(p, x, pool):
    h, hs = h0(x), []
    for t in range(T):
      h = jnp.tanh(x[:, t] @ p['wx'] + p['b'] + h @ p['wh'])
      hs.append(h)
    return (sum(hs) / T if pool else h) @ p['o']

  for pool in (False, True):
    net = Net(pool)
    params = net.init(jax.random.PRNGKey(0), X)['params']
    stats = {'SimpleCell_0': {'i': {'kernel': iw.ParamStats(0., 1. / D),
                                    'bias': iw.ParamStats(0., 0.)},
                              'h': {'kernel': iw.ParamStats(0., 1. / H)}},
             'Dense_0': {'kernel': iw.ParamStats(0., 1. / H)}}
    flax_k = iw.kernelize(lambda p, x: net.apply({'params': p}, x), params,
                          param_stats=stats)(X, None, GET)
    plain_shapes = {'wx': (D, H), 'b': (H,), 'wh': (H, H), 'o': (H, 256)}
    plain_stats = {'wx': iw.ParamStats(0., 1. / D), 'b': iw.ParamStats(0., 0.),
                   'wh': iw.ParamStats(0., 1. / H), 'o': iw.ParamStats(0., 1. / H)}
    assert_same(flax_k, kernel(lambda p, x: plain(p, x, pool), shapes=plain_shapes,
                               stats=plain_stats))


def test_haiku_dynamic_unroll_equals_plain_jax():
  def forward(x):
    core = hk.VanillaRNN(H)
    ys, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
    return hk.Linear(256, with_bias=False)(ys[-1])

  f = hk.without_apply_rng(hk.transform(forward))
  params = f.init(jax.random.PRNGKey(0), X)
  stats = jax.tree.map(lambda l: iw.ParamStats(0., 1. / l.shape[0] if l.ndim == 2 else 0.),
                       params)
  hk_k = iw.kernelize(f.apply, params, param_stats=stats)(X, None, GET)

  def plain(p, x):
    h = h0(x)
    for t in range(T):
      # VanillaRNN: relu, a bias on each of its two linear maps.
      h = jax.nn.relu(x[:, t] @ p['wx'] + p['b'] + h @ p['wh'] + p['b2'])
    return h @ p['o']
  shapes = {'wx': (D, H), 'b': (H,), 'b2': (H,), 'wh': (H, H), 'o': (H, 256)}
  stats = {'wx': iw.ParamStats(0., 1. / D), 'b': iw.ParamStats(0., 0.),
           'b2': iw.ParamStats(0., 0.),
           'wh': iw.ParamStats(0., 1. / H), 'o': iw.ParamStats(0., 1. / H)}
  assert_same(hk_k, kernel(plain, shapes=shapes, stats=stats))


def test_bidirectional_concatenates_the_two_directions():
  def bidirectional(p, x):
    xs = jnp.swapaxes(x, 0, 1)
    fwd = lax.scan(lambda h, x_t: (cell(p, h, x_t),) * 2, h0(x), xs)[1]
    bwd = lax.scan(lambda h, x_t: (cell(p, h, x_t),) * 2, h0(x), xs, reverse=True)[1]
    both = jnp.concatenate([fwd, bwd], axis=-1)        # (T, N, 2H)
    return both.mean(0) @ p['o2'] / np.sqrt(2 * H)

  def python_bidirectional(p, x):
    f, b, fs, bs = h0(x), h0(x), [], []
    for t in range(T):
      f = cell(p, f, x[:, t])
      b = cell(p, b, x[:, T - 1 - t])
      fs.append(f)
      bs.append(b)
    both = jnp.concatenate([sum(fs) / T, sum(bs) / T], axis=-1)
    return both @ p['o2'] / np.sqrt(2 * H)

  shapes = dict(SHAPES, o2=(2 * H, 256))
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  assert_same(kernel(bidirectional, shapes=shapes, stats=stats),
              kernel(python_bidirectional, shapes=shapes, stats=stats))


def test_a_while_loop_of_unknown_length_is_refused_with_its_line():
  def until_small(p, x):
    h = lax.while_loop(lambda h: jnp.sum(h ** 2) > 1.0, lambda h: cell(p, h, x[:, 0]),
                       x[:, 0] @ p['wx'])
    return readout(p, h)
  with pytest.raises(iw.UnsupportedPrimitiveError,
                     match='(?s)while_loop whose trip count.*test_recurrence.py.*lax.scan'):
    kernel(until_small)


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
def test_a_refusal_inside_a_library_cell_names_the_users_line():
  """A Flax cell's step is traced inside Flax: the error names the line of
  the user's `nn.RNN` call, not an unknown location."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.RNN(nn.SimpleCell(16, activation_fn=jax.nn.softmax))(x)[:, -1])
  x = X[:, :2].astype(jnp.float32)
  v = M().init(jax.random.PRNGKey(1), x)
  with pytest.raises(iw.UnsupportedPrimitiveError,
                     match=r'(?s)reduce_max.*at: .*test_recurrence.py:\d+ \(.*M\.__call__\)'):
    iw.kernelize(M().apply, v)(x, None, 'nngp')


def test_flax_scan_over_layers_equals_the_unrolled_layers():
  """`nn.scan` of a block with `variable_axes={'params': 0}`: the parameters
  of the layers stacked, each step a slice (an independent weight)."""
  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return nn.tanh(nn.Dense(H, param_dtype=h.dtype)(h)), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(H, param_dtype=x.dtype)(x)
      layers = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                       length=3)
      return nn.Dense(8, param_dtype=x.dtype)(layers()(h, None)[0])

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(H, param_dtype=x.dtype)(x)
      for _ in range(3):
        h = nn.tanh(nn.Dense(H, param_dtype=x.dtype)(h))
      return nn.Dense(8, param_dtype=x.dtype)(h)

  def stats(path, leaf):   # N(0, 1/fan_in) kernels, zero biases
    if 'kernel' in jax.tree_util.keystr(path):
      return iw.ParamStats(0., 1. / leaf.shape[-2])
    return iw.ParamStats(0., 0.)

  x = X[:, 0]
  kernels = []
  for net in (Scanned(), Unrolled()):
    params = net.init(jax.random.PRNGKey(0), x)['params']
    kf = iw.kernelize(lambda p, x, net=net: net.apply({'params': p}, x), params,
                      param_stats=jax.tree_util.tree_map_with_path(stats, params))
    kernels.append(kf(x, None, GET))
  stacked = Scanned().init(jax.random.PRNGKey(0), x)['params']['ScanBlock_0']['Dense_0']
  assert stacked['kernel'].shape == (3, H, H)
  assert_same(*kernels)


def test_polyval_scans_from_zero_to_the_written_polynomial():
  """`jnp.polyval` is a scan (Horner's rule) whose carry starts at an exact
  zero: zero times a wide value is zero, never a term of zero variance."""
  coefs = jnp.array([0.3, -0.5, 0.2, 0.1])
  shapes = {'w': (D, H), 'o': (H, 8)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  horner = lambda p, x: jnp.polyval(coefs, x[:, 0] @ p['w'] / np.sqrt(D)) @ p['o'] / np.sqrt(H)

  def written(p, x):
    h = x[:, 0] @ p['w'] / np.sqrt(D)
    return (0.3 * h ** 3 - 0.5 * h ** 2 + 0.2 * h + 0.1) @ p['o'] / np.sqrt(H)

  a, b = kernel(horner, shapes=shapes, stats=stats), kernel(written, shapes=shapes, stats=stats)
  assert np.all(np.isfinite(a.nngp)) and np.all(np.isfinite(a.ntk))
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-12)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-12)


LSTM_SHAPES = {'wx': (D, 4 * H), 'wh': (H, 4 * H), 'b': (4 * H,), 'o': (H, 256)}
LSTM_STATS = {'wx': iw.ParamStats(0., 1.), 'wh': iw.ParamStats(0., 1.),
              'b': iw.ParamStats(0., 0.09), 'o': iw.ParamStats(0., 1.)}


def lstm(p, x):
  """An LSTM whose four gates come from one matrix, split: the blocks are
  independent Gaussians (other columns of the same weights). The cell state
  `f⊙c + i⊙g` is a non-polynomial function of all earlier gates, integrated
  by the quasi-Monte Carlo rule (docs/semantics.md)."""
  def step(carry, x_t):
    h, c = carry
    z = x_t @ p['wx'] / np.sqrt(D) + h @ p['wh'] / np.sqrt(H) + 0.3 * p['b']
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  (h, _), _ = lax.scan(step, (h0(x), h0(x)), jnp.swapaxes(2. * x, 0, 1))
  return readout(p, h)


def test_lstm_matches_monte_carlo():
  x = X[:, :2]
  k = kernel(lstm, x, LSTM_SHAPES, LSTM_STATS)
  nngp, ntk = monte_carlo(lstm, LSTM_SHAPES, LSTM_STATS, x)
  check_against_mc(k.nngp, nngp, 2, H)
  check_against_mc(k.ntk, ntk, 2, H)


def test_split_gates_are_independent_blocks():
  """`z[:, :H] * z[:, H:]` of one dense layer equals the product of two
  separate layers (the blocks are other columns of the weight), not z²."""
  def sliced(p, x):
    z = x @ p['w'] / np.sqrt(D)
    return (z[:, :H] * jnp.split(z, 2, axis=-1)[1]) @ p['o'] / np.sqrt(H)

  def two(p, x):
    a, b = x @ p['w'][:, :H] / np.sqrt(D), x @ p['w'][:, H:] / np.sqrt(D)
    return (a * b) @ p['o'] / np.sqrt(H)

  shapes = {'w': (D, 2 * H), 'o': (H, 8)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  x = X[:, 0]
  assert_same(kernel(sliced, x, shapes, stats), kernel(two, x, shapes, stats))
  lin = x @ x.T / D
  np.testing.assert_allclose(kernel(sliced, x, shapes, stats).nngp, lin ** 2, rtol=1e-10)


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
def test_flax_lstm_cell_runs_unchanged():
  """Flax's `nn.RNN(nn.LSTMCell)` kernelizes unchanged (gates by separate
  dense layers): symmetric, positive semi-definite within the rule's error."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.RNN(nn.LSTMCell(64))(x)[:, -1])
  m = M()
  x = 2. * X[:, :2].astype(jnp.float32)
  v = m.init(jax.random.PRNGKey(1), x)
  k = iw.kernelize(m.apply, v)(x, None, GET)
  for a in (k.nngp, k.ntk):
    a = np.asarray(a, np.float64)
    np.testing.assert_allclose(a, a.T, rtol=2e-2, atol=1e-4)
    assert np.linalg.eigvalsh((a + a.T) / 2).min() > -1e-3 * np.abs(a).max()
    assert np.all(np.diag(a) > 0)


GRU_SHAPES = {'wx': (D, 3 * H), 'wh': (H, 2 * H), 'wn': (H, H), 'b': (3 * H,), 'bn': (H,),
              'o': (H, 256)}
GRU_STATS = {'wx': iw.ParamStats(0., 1.), 'wh': iw.ParamStats(0., 1.), 'wn': iw.ParamStats(0., 1.),
             'b': iw.ParamStats(0., 0.09), 'bn': iw.ParamStats(0., 0.09),
             'o': iw.ParamStats(0., 1.)}


def gru(p, x):
  """A GRU (Flax's `GRUCell` equations): `h′ = (1 − z)·n + z·h` with
  `n = tanh(a + r·(W_n h + b_n))`. The state is a sum of products of
  independent gates, and the same weights at every step correlate each
  factor with several factors of the next step's state: the engine pairs such
  values by one joint integral (docs/semantics.md)."""
  def step(h, x_t):
    gx = x_t @ p['wx'] / np.sqrt(D) + 0.3 * p['b']
    gh = h @ p['wh'] / np.sqrt(H)
    r = jax.nn.sigmoid(gx[:, :H] + gh[:, :H])
    z = jax.nn.sigmoid(gx[:, H:2 * H] + gh[:, H:])
    n = jnp.tanh(gx[:, 2 * H:] + r * (h @ p['wn'] / np.sqrt(H) + 0.3 * p['bn']))
    h = (1. - z) * n + z * h
    return h, h
  h, _ = lax.scan(step, h0(x), jnp.swapaxes(2. * x, 0, 1))
  return readout(p, h)


def test_gru_matches_monte_carlo():
  x = X[:, :2]
  k = kernel(gru, x, GRU_SHAPES, GRU_STATS)
  nngp, ntk = monte_carlo(gru, GRU_SHAPES, GRU_STATS, x)
  check_against_mc(k.nngp, nngp, 2, H)
  check_against_mc(k.ntk, ntk, 2, H)


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
@pytest.mark.parametrize('library', ['flax', 'haiku'])
def test_flax_and_haiku_gru_cells_run_unchanged(library):
  """Flax's `nn.RNN(nn.GRUCell)` and Haiku's `hk.GRU` under `dynamic_unroll`
  kernelize unchanged: symmetric and positive semi-definite within the
  rule's error, positive diagonals."""
  x = 2. * X[:, :2].astype(jnp.float32)
  if library == 'flax':
    class M(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(1)(nn.RNN(nn.GRUCell(64))(x)[:, -1])
    f, v = M().apply, M().init(jax.random.PRNGKey(1), x)
  else:
    def forward(x):
      core = hk.GRU(64)
      out, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
      return hk.Linear(1)(out[-1])
    t = hk.without_apply_rng(hk.transform(forward))
    f, v = t.apply, t.init(jax.random.PRNGKey(1), x)
  k = iw.kernelize(f, v)(x, None, GET)
  for a in (k.nngp, k.ntk):
    a = np.asarray(a, np.float64)
    np.testing.assert_allclose(a, a.T, rtol=2e-2, atol=1e-4)
    assert np.linalg.eigvalsh((a + a.T) / 2).min() > -1e-3 * np.abs(a).max()
    assert np.all(np.diag(a) > 0)


def _per_step_readouts(p, x):
  """Every step's readout, `(N, T, C)`: the step axis is kept."""
  _, hs = lax.scan(lambda h, x_t: (cell(p, h, x_t),) * 2, h0(x), jnp.swapaxes(x, 0, 1))
  return jnp.swapaxes(hs, 0, 1) @ p['o'] / np.sqrt(H)


def _python_per_step_readouts(p, x):
  h, outs = h0(x), []
  for t in range(T):
    h = cell(p, h, x[:, t])
    outs.append(readout(p, h))
  return jnp.stack(outs, 1)


def _readout_of_steps(*steps):
  def f(p, x):
    _, hs = lax.scan(lambda h, x_t: (cell(p, h, x_t),) * 2, h0(x), jnp.swapaxes(x, 0, 1))
    return sum(readout(p, hs[t]) for t in steps)
  return f


def test_sequence_outputs_keep_the_step_axis():
  """`(N, T, C)` outputs give `(N, N, T, T)` kernels whose block `(t, t′)` is
  the covariance of steps t and t′: the diagonal blocks equal the kernels of
  one step's readout, and `K_tt′ + K_t′t` that of the sum of two steps'
  readouts minus their own. A Python loop stacking its readouts agrees."""
  k = kernel(_per_step_readouts)
  assert k.nngp.shape == (N, N, T, T) and k.ntk.shape == (N, N, T, T)
  assert_same(k, kernel(_python_per_step_readouts))
  own = [kernel(_readout_of_steps(t)) for t in range(T)]
  for t in range(T):
    np.testing.assert_allclose(k.nngp[:, :, t, t], own[t].nngp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(k.ntk[:, :, t, t], own[t].ntk, rtol=1e-12, atol=1e-14)
  for t, s in ((0, 2), (1, 2)):
    both = kernel(_readout_of_steps(t, s))
    for f in ('nngp', 'ntk'):
      a, b = getattr(k, f), getattr(both, f)
      np.testing.assert_allclose(a[:, :, t, s] + a[:, :, s, t],
                                 b - getattr(own[t], f) - getattr(own[s], f),
                                 rtol=1e-10, atol=1e-12)
  # Symmetry of the joint kernel: K(x, x′)_{ts} = K(x′, x)_{st}, and the
  # cross-step blocks are not zero.
  np.testing.assert_allclose(k.nngp, np.transpose(k.nngp, (1, 0, 3, 2)), rtol=1e-12)
  assert np.abs(k.nngp[:, :, 0, 2]).max() > 1e-3


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
def test_flax_rnn_sequence_outputs():
  """Flax `nn.Dense` over every step of `nn.RNN`'s outputs keeps the steps:
  equal to the plain-JAX network with the same parameters."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, use_bias=False)(nn.RNN(nn.SimpleCell(16))(x))
  m = M()
  x = X.astype(jnp.float32)
  v = m.init(jax.random.PRNGKey(1), x)
  def plain(p, x):
    cell_p = p['SimpleCell_0']

    def step(h, x_t):
      h = jnp.tanh(x_t @ cell_p['i']['kernel'] + cell_p['i']['bias'] + h @ cell_p['h']['kernel'])
      return h, h
    _, hs = lax.scan(step, jnp.zeros((x.shape[0], 16), x.dtype), jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(hs, 0, 1) @ p['Dense_0']['kernel']

  k = iw.kernelize(m.apply, v)(x, None, GET)
  assert k.nngp.shape == (N, N, T, T)
  want = iw.kernelize(plain, v['params'])(x, None, GET)
  np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-5, atol=1e-7)


def test_weight_in_two_branches_matches_monte_carlo():
  """One weight applied to two values (`x` and `2x`) is one source: the
  branches are correlated through it."""
  def two_branches(p, x):
    a = jnp.tanh(x @ p['w'] / np.sqrt(D))
    b = jax.nn.relu((2. * x) @ p['w'] / np.sqrt(D))
    return (a + b) @ p['o'] / np.sqrt(H)
  shapes = {'w': (D, H), 'o': (H, 256)}
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  x = X[:, 0]
  k = kernel(two_branches, x, shapes, stats)
  nngp, ntk = monte_carlo(two_branches, shapes, stats, x)
  check_against_mc(k.nngp, nngp, 1, H)
  check_against_mc(k.ntk, ntk, 1, H)


@pytest.mark.parametrize('tied', ['autoencoder', 'embedding'])
def test_a_weight_used_with_its_transpose_is_refused(tied):
  """`h = φ(x W)`, `y = h Wᵀ`: W is correlated with h, and the finite
  networks' kernel grows with the width (E[W_dc φ(z_c)] ≠ 0), so no
  silent kernel: the refusal names the parameter, and the fallbacks apply."""
  V = 7
  if tied == 'autoencoder':
    f = lambda p, x: jnp.tanh(x @ p['w'] / np.sqrt(D)) @ p['w'].T / np.sqrt(H)
    shapes, x = {'w': (D, H)}, X[:, 0]
  else:
    f = lambda p, ids: jnp.tanh(p['w'][ids] @ p['v'] / np.sqrt(H)) @ p['w'].T / np.sqrt(H)
    shapes, x = {'w': (V, H), 'v': (H, H)}, jnp.array([1, 2, 1])
  stats = {k: iw.ParamStats(0., 1.) for k in shapes}
  with pytest.raises(iw.UnsupportedPrimitiveError, match=r"\['w'\].*transpose"):
    kernel(f, x, shapes, stats)


def test_hundreds_of_steps():
  """A 200-step recurrence: the moment engine's recursion through the steps
  stays within Python's limits, and the kernel is finite and symmetric."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 200, D))
  k = kernel(with_scan, x)
  for a in (k.nngp, k.ntk):
    assert np.all(np.isfinite(a)) and np.all(np.diag(a) > 0)
    np.testing.assert_allclose(a, a.T, rtol=1e-12)
