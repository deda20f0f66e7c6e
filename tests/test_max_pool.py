"""Max pooling: `reduce_window_max` (`lax.reduce_window` with `lax.max`, Flax
`nn.max_pool`, Haiku `hk.max_pool`), a generic `reduce_window` with a `max`
body, and `jnp.max` over positions.

Each output position is the maximum of the window's entries, a function of
several jointly Gaussian values integrated by the quasi-Monte Carlo rule
(docs/semantics.md, "Max pooling"). Oracles: the closed form of
`E[max(u₁,u₂) max(v₁,v₂)]` for any centred Gaussian `(u₁,u₂,v₁,v₂)` (below),
the same network written with slices and `jnp.maximum` (a second
implementation, to round-off), Monte Carlo of finite networks (width 512 and
256), and the same network in Flax.

Closed form: `max(u₁,u₂) = s/2 + |d|/2` with `s = u₁+u₂`, `d = u₁−u₂`. As
`E[s|d′|] = 0` (odd under `z → −z`), `E[max max′] = E[ss′]/4 + E[|d||d′|]/4`,
and `E[|d||d′|] = (2/π)(√(ab − c²) + c·arcsin(c/√(ab)))` with `a, b` the
variances of `d, d′` and `c` their covariance. The NTK: `∂max/∂u₁ = 1[d > 0]`
and `P(d > 0, d′ > 0) = 1/4 + arcsin(ρ)/2π` (Sheppard). A window of one entry
(an edge window of SAME padding) is the same formula with `u₁ = u₂`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import infwidth as iw
from rule_oracles import max_of_two_moments
from infwidth.domain.needs import Need
from infwidth.interpreters.compat import CALL_PRIMITIVES
from infwidth.interpreters.flat_program import flatten
from infwidth.interpreters.requirements import requirements
from infwidth.interpreters.walker import trace
from infwidth.rules.elementwise import MAX_GAUSSIANS
from test_kernelize_monte_carlo import check_against_mc, monte_carlo, sample_gaussian, unit_stats

SW, SB = 1.5, 0.2        # hidden layers
RW, RB = 1.2, 0.1        # readout
C = 256                  # logits (their NNGP is averaged within each Monte Carlo draw)
D = 3
NWC = ('NWC', 'WIO', 'NWC')
NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv(w, b, x, stride=1, padding='SAME'):
  """NTK-parameterised convolution (1-D NWC or 2-D NHWC by the filter's rank)."""
  k = w.ndim - 2
  fan_in = int(np.prod(w.shape[:-1]))
  y = lax.conv_general_dilated(x, w, (stride,) * k, padding,
                               dimension_numbers=NWC if k == 1 else NHWC)
  return SW / np.sqrt(fan_in) * y + SB * b


def dense(w, b, h):
  return RW / np.sqrt(w.shape[0]) * (h @ w) + RB * b


def max_pool_1d(h, window, stride, padding, init=-jnp.inf):
  return lax.reduce_window(h, init, lax.max, (1, window, 1), (1, stride, 1), padding)


def _shapes(width, filt=(3,), hidden=(), d=D):
  s = {'c1': (tuple(filt) + (d, width), (width,))}
  for name in hidden:
    s[name] = (tuple(filt) + (width, width), (width,))
  s['o'] = ((width, C), (C,))
  return s


_CACHE = {}


def _kernel(net, shapes, x, jit=False, **options):
  """NNGP and NTK with exact moments (they do not depend on the width),
  memoised for the module's named networks (several tests read one kernel)."""
  key = (net, jit, np.asarray(x).tobytes(), np.shape(x), repr(sorted(options.items())))
  if key not in _CACHE:
    _CACHE[key] = _kernel_uncached(net, shapes, x, jit, **options)
  return _CACHE[key]


def _kernel_uncached(net, shapes, x, jit=False, **options):
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(99), shapes, stats)
  kf = iw.kernelize(net, params, param_stats=stats, **options)
  if jit:
    kf = jax.jit(kf, static_argnames='get')
  return kf(x, None, ('nngp', 'ntk'))


def _x(shape, n=4, seed=3):
  return 0.9 * jax.random.normal(jax.random.PRNGKey(seed), (n,) + shape)


# ----------------------------------------------------------------------------
# The closed form for windows of one or two entries of a Gaussian value.


def _conv1d_kernel(x, window=3):
  """K(x, x′)[i, j] of `conv(x)` (stride 1, SAME, NTK parameterisation): also
  its NTK (the weight and bias gradients give the same sum)."""
  x = np.asarray(x, np.float64)
  n, length, d = x.shape
  pad = (window - 1) // 2
  xp = np.pad(x, ((0, 0), (pad, window - 1 - pad), (0, 0)))
  patches = np.stack([xp[:, i:i + window].reshape(n, -1) for i in range(length)], 1)
  return SW ** 2 * np.einsum('aip,bjp->abij', patches, patches) / (window * d) + SB ** 2


def _readout_of_mean(second, theta):
  """NNGP and NTK of `dense(mean over positions)` of a value with these moments."""
  nngp = RW ** 2 * second.mean((2, 3)) + RB ** 2
  return nngp, nngp + RW ** 2 * theta.mean((2, 3))


def _gaussian_pool_net(window, stride, padding):
  def net(p, x):
    h = max_pool_1d(conv(*p['c1'], x), window, stride, padding)
    return dense(*p['o'], h.mean(1))
  return net


@pytest.mark.parametrize('length,padding,windows', [
    (8, 'VALID', [(0, 1), (2, 3), (4, 5), (6, 7)]),
    # SAME, odd length: padding (0, 1), the last window holds one entry.
    (7, 'SAME', [(0, 1), (2, 3), (4, 5), (6, 6)])])
def test_window_of_two_matches_the_closed_form(length, padding, windows):
  """Max pooling (window 2, stride 2) of a convolution, which takes negative
  values: against the closed form, NNGP and NTK. The SAME case is exact at
  the edge (a window of one entry), where padding with 0 would give
  `max(u, 0)`; the test also checks that this would be caught."""
  x = _x((length, D))
  k = _kernel(_gaussian_pool_net(2, 2, padding), _shapes(16), x)
  kh = _conv1d_kernel(x)
  nngp, ntk = _readout_of_mean(*max_of_two_moments(kh, windows))
  # The quasi-Monte Carlo rule's error at its default point count: < 1%.
  np.testing.assert_allclose(k.nngp, nngp, rtol=1e-2)
  np.testing.assert_allclose(k.ntk, ntk, rtol=1e-2)
  for m in (k.nngp, k.ntk):
    # Symmetric by construction of the rule, to the round-off of the roots of
    # singular covariances (an edge window repeats its entry): 7e-9 measured.
    np.testing.assert_allclose(m, m.T, rtol=1e-7)
    assert np.linalg.eigvalsh(m).min() > 0
  if padding == 'SAME':
    def zero_padded(p, x):
      h = jnp.pad(conv(*p['c1'], x), ((0, 0), (0, 1), (0, 0)))
      return dense(*p['o'], max_pool_1d(h, 2, 2, 'VALID').mean(1))
    wrong = _kernel(zero_padded, _shapes(16), x)
    assert np.abs(wrong.nngp - nngp).max() > 5 * np.abs(k.nngp - nngp).max()


def _relu_pool_net(p, x):
  h = max_pool_1d(jax.nn.relu(conv(*p['c1'], x)), 2, 2, 'VALID')
  return dense(*p['o'], h.mean(1))


def _relu_of_sliced_max_net(p, x):
  h = conv(*p['c1'], x)
  return dense(*p['o'], jax.nn.relu(jnp.maximum(h[:, 0::2], h[:, 1::2])).mean(1))


def _relu_pool_init_zero_net(p, x):
  h = max_pool_1d(jax.nn.relu(conv(*p['c1'], x)), 2, 2, 'VALID', init=0.)
  return dense(*p['o'], h.mean(1))


X8 = _x((8, D))


def test_pool_equals_slices_and_maximum():
  """The network written with strided slices and `jnp.maximum` (the rules for
  slices and for `max` of several Gaussians) gives the same kernels to
  round-off: `max(relu(h₁), relu(h₂)) = relu(max(h₁, h₂))`. (For a Gaussian
  operand, pooling equals slices too; the closed-form test covers it.)"""
  a = _kernel(_relu_pool_net, _shapes(16), X8)
  b = _kernel(_relu_of_sliced_max_net, _shapes(16), X8)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)


def test_generic_reduce_window_with_max_body():
  """`lax.reduce_window` with a finite initial value binds the generic
  primitive, XLA's `max(init, window)`: for a ReLU operand an initial value
  of 0 changes nothing."""
  shapes = _shapes(16)
  jaxpr = jax.make_jaxpr(_relu_pool_init_zero_net)(
      sample_gaussian(jax.random.PRNGKey(0), shapes, unit_stats(shapes)), X8)
  assert lax.reduce_window_p in {e.primitive for e in jaxpr.jaxpr.eqns}
  a = _kernel(_relu_pool_net, shapes, X8)
  b = _kernel(_relu_pool_init_zero_net, shapes, X8)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)


@pytest.mark.slow
def test_generic_reduce_window_initial_value_is_an_argument_of_the_max():
  """For a Gaussian operand, an initial value of 0 is `max(0, …)`: the ReLU
  of the pooled value."""
  shapes = _shapes(16)
  init_zero = lambda p, x: dense(*p['o'], max_pool_1d(conv(*p['c1'], x), 2, 2, 'VALID',
                                                      init=0.).mean(1))
  relu_after = lambda p, x: dense(*p['o'], jax.nn.relu(
      max_pool_1d(conv(*p['c1'], x), 2, 2, 'VALID')).mean(1))
  a, b = _kernel(init_zero, shapes, X8), _kernel(relu_after, shapes, X8)
  np.testing.assert_allclose(a.nngp, b.nngp, rtol=1e-10)
  np.testing.assert_allclose(a.ntk, b.ntk, rtol=1e-10)


def test_stax_max_pool_equals_plain_jax():
  """`infwidth.stax.MaxPool` in a serial network: the kernel of the same
  network in plain JAX (NTK parameterisation on both sides)."""
  from infwidth import stax
  _, _, kernel_fn = stax.serial(stax.Conv(16, (3,), padding='SAME', W_std=SW, b_std=SB),
                                stax.Relu(), stax.MaxPool((2,), (2,)), stax.GlobalAvgPool(),
                                stax.Dense(C, W_std=RW, b_std=RB))
  k = kernel_fn(X8, None, ('nngp', 'ntk'))
  want = _kernel(_relu_pool_net, _shapes(16), X8)
  np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-10)
  np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-10)


def test_1d_pool_matches_monte_carlo():
  width = 512
  shapes = _shapes(width)
  k = _kernel(_relu_pool_net, shapes, X8)
  nngp, ntk = monte_carlo(_relu_pool_net, shapes, unit_stats(shapes), X8)
  check_against_mc(k.nngp, nngp, 1, width)
  check_against_mc(k.ntk, ntk, 1, width)


def _cnn(p, x):
  """conv 3×3 → relu → max pool 3×3 stride 2 SAME → conv 3×3 → global mean → dense."""
  h = jax.nn.relu(conv(*p['c1'], x))
  h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
  h = conv(*p['c2'], h)
  return dense(*p['o'], h.mean((1, 2)))


def test_2d_cnn_with_same_max_pool_matches_monte_carlo_under_jit():
  width = 256
  shapes = _shapes(width, (3, 3), ('c2',))
  x = _x((4, 4, D), n=3)
  k = _kernel(_cnn, shapes, x, jit=True)
  nngp, ntk = monte_carlo(_cnn, shapes, unit_stats(shapes), x, n_samples=32)
  check_against_mc(k.nngp, nngp, 2, width)
  check_against_mc(k.ntk, ntk, 2, width)
  for m in (k.nngp, k.ntk):
    np.testing.assert_allclose(m, m.T, rtol=1e-7)   # edge windows: singular covariances


def test_max_pool_operand_needs_full_blocks():
  """Max pooling mixes positions: below it full blocks, above a flatten
  readout pixel diagonals; both give the kernel of the spatial output."""
  shapes = {'c1': ((3, D, 8), (8,)), 'f': (4 * 8, C)}
  stats = unit_stats(shapes)
  params = sample_gaussian(jax.random.PRNGKey(0), shapes, stats)
  x = _x((8, D), n=2)

  def flat(p, x):
    h = max_pool_1d(jax.nn.relu(conv(*p['c1'], x)), 2, 2, 'VALID')
    return h.reshape(h.shape[0], -1) @ p['f'] * (RW / np.sqrt(h.shape[1] * h.shape[2]))

  def spatial(p, x):
    return max_pool_1d(jax.nn.relu(conv(*p['c1'], x)), 2, 2, 'VALID')

  closed = trace(flat, params, x)
  req = requirements(closed)
  prog = flatten(closed, inline=CALL_PRIMITIVES)
  needs = {op.prim: req.needs.get(op.outs[0]) for op in prog.ops}
  assert req.pixel_diagonal
  assert needs[lax.conv_general_dilated_p] == Need.FULL
  assert needs[lax.reduce_window_max_p] == Need.PIXEL_DIAGONAL

  k_flat = iw.kernelize(flat, params, param_stats=stats)(x, None, 'nngp')
  k_sp = iw.kernelize(spatial, params, param_stats=stats)(x, None, 'nngp')   # (N, N, L, L)
  want = RW ** 2 * np.einsum('abii->ab', np.asarray(k_sp)) / k_sp.shape[2]
  np.testing.assert_allclose(k_flat, want, rtol=1e-10)


def test_global_max_over_positions():
  """`jnp.max` over the positions: of two positions, the closed form; of more
  positions than the rule's Gaussian limit, a clear error; over the channel
  axis, a clear error (no infinite-width limit)."""
  x = _x((2, D))
  net = lambda p, x: dense(*p['o'], jnp.max(conv(*p['c1'], x), axis=1))
  k = _kernel(net, _shapes(16), x)
  nngp, ntk = _readout_of_mean(*max_of_two_moments(_conv1d_kernel(x), [(0, 1)]))
  # 1% of the largest entry (some entries here are near 0).
  for got, want in ((k.nngp, nngp), (k.ntk, ntk)):
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()

  many = _x((MAX_GAUSSIANS + 1, D), n=2)
  with pytest.raises(iw.UnsupportedPrimitiveError, match='reduce_max') as e:
    _kernel(net, _shapes(16), many)
  assert f'up to {MAX_GAUSSIANS}' in str(e.value)
  over_channels = lambda p, x: jnp.max(conv(*p['c1'], x), axis=-1, keepdims=True).mean(1)
  with pytest.raises(iw.UnsupportedPrimitiveError, match='channel'):
    _kernel(over_channels, _shapes(16), x)


def test_max_pool_of_an_average_pool_of_a_relu_is_refused():
  """The entries of an average pool of a ReLU are not jointly Gaussian: a
  clear error, not a kernel computed as if they were."""
  def net(p, x):
    h = 2.0 * lax.reduce_window(jax.nn.relu(conv(*p['c1'], x)), 0., lax.add, (1, 2, 1),
                                (1, 1, 1), 'VALID') + SB * p['c1'][1]
    return dense(*p['o'], max_pool_1d(h, 2, 2, 'VALID').mean(1))
  with pytest.raises(iw.UnsupportedPrimitiveError, match='non-Gaussian'):
    _kernel(net, _shapes(16), _x((9, D), n=2))


# ----------------------------------------------------------------------------
# Flax: a ResNet-style stem, kernelized unchanged.


class Stem(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(self.width, (3, 3))(x))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding='SAME')
    h = nn.Conv(self.width, (3, 3))(h)
    return nn.Dense(C)(h.mean((1, 2)))


def _plain_stem(p, x):
  p = p['params']
  c = lambda q, h: lax.conv_general_dilated(h, q['kernel'], (1, 1), 'SAME',
                                            dimension_numbers=NHWC) + q['bias']
  h = jax.nn.relu(c(p['Conv_0'], x))
  h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
  h = c(p['Conv_1'], h)
  return h.mean((1, 2)) @ p['Dense_0']['kernel'] + p['Dense_0']['bias']


@pytest.mark.filterwarnings('ignore:parameter moments estimated')
def test_flax_stem_float32_equals_plain_jax():
  x = np.asarray(_x((4, 4, D), n=2), np.float32)
  model = Stem(32)
  variables = model.init(jax.random.PRNGKey(0), x)
  # Nonzero biases, so that every parameter has a kernel term.
  variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(
      jax.random.PRNGKey(a.size), a.shape, a.dtype) if a.ndim == 1 else a, variables)
  # Fewer points than the default: the two kernels are equal at any count.
  flax_k = iw.kernelize(model.apply, variables, integration_points=2048)(x, None, ('nngp', 'ntk'))
  plain = iw.kernelize(_plain_stem, variables, integration_points=2048)(x, None, ('nngp', 'ntk'))
  for a, b in zip(flax_k, plain):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=1e-5)
    a = np.asarray(a, np.float64)
    np.testing.assert_allclose(a, a.T, rtol=1e-5)
    # PSD within the rule's error (about 2% of the largest entry at 2048 points).
    assert np.linalg.eigvalsh(a).min() > -2e-2 * np.abs(a).max()


def test_haiku_and_flax_max_pool_bind_the_supported_primitive():
  """`hk.max_pool` and `nn.max_pool` bind `reduce_window_max` with the same
  window, strides and padding as `lax.reduce_window(…, lax.max, …)`."""
  import haiku as hk
  x = jnp.ones((2, 7, 7, 3))
  eqns = [jax.make_jaxpr(f)(x).jaxpr.eqns for f in (
      lambda x: hk.max_pool(x, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'),
      lambda x: nn.max_pool(x, (3, 3), (2, 2), 'SAME'),
      lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME'))]
  for e in eqns:
    assert [q.primitive for q in e] == [lax.reduce_window_max_p]
    assert e[0].params == eqns[-1][0].params
