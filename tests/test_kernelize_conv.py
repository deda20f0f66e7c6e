"""Convolutional networks: kernelize against NT 0.6.5, Monte Carlo and itself.

* NT: tests/fixtures/conv_nt.npz holds NT's `stax` kernels (float64) of the
  networks rebuilt here in plain JAX with NT's parameterisation: filters
  W ~ N(0, 1) of shape (*filter, in, out) scaled by σ_w/√(in·|filter|), biases
  b ~ N(0, 1) times σ_b, `param_stats` exact. Both sides are closed forms
  evaluated in float64, so they agree to rounding: 1e-6 relative leaves room
  for the two implementations' different arccos/arcsin evaluations and
  summation orders (measured: 1e-16 for GAP and pooled networks, up to 2e-9
  for Flatten readouts of ReLU CNNs).
* Monte Carlo: averages over parameter draws of finite networks of
  f(x1) f(x2)ᵀ / C (NNGP) and of `empirical_ntk_fn` (NTK); the tolerance is
  k·SE plus a finite-width term c·L/n·max|K| (DESIGN §6), as in
  tests/test_kernelize_monte_carlo.py, and each check also asserts that it
  would catch a kernel 15% off on the diagonal.
"""

import functools
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy.special import erf

import infwidth as iw
import mc_check
from infwidth.empirical import empirical_ntk_fn

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'conv_nt.npz')
SW, SB = 1.5, 0.2          # hidden layers (as in make_conv_nt.py)
RW, RB = 1.2, 0.1          # readout
NHWC = ('NHWC', 'HWIO', 'NHWC')
NWC = ('NWC', 'WIO', 'NWC')
RTOL_NT = 1e-6


def _is_shape(s):
  return isinstance(s, tuple) and all(isinstance(i, int) for i in s)


def unit_stats(shapes):
  return jax.tree.map(lambda s: iw.ParamStats(0.0, 1.0), shapes, is_leaf=_is_shape)


def draw(shapes, seed, dtype=np.float64):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), dtype), shapes,
                      is_leaf=_is_shape)


def conv(p, h, *, sw=SW, sb=SB, strides=None, padding='SAME', dn=NHWC, **kw):
  """NT-parameterised convolution; `p` is (filter,) or (filter, bias)."""
  w = p[0]
  k = w.ndim - 2
  # Filter layout from the dimension numbers: fan_in = in channels × filter size.
  out_ax = dn[1].index('O')
  fan_in = math.prod(w.shape) // w.shape[out_ax]
  y = float(sw / np.sqrt(fan_in)) * lax.conv_general_dilated(
      h, w, strides or (1,) * k, padding, dimension_numbers=dn, **kw)
  if len(p) > 1:
    c_ax = dn[2].index('C')
    y = y + sb * jnp.expand_dims(p[1], tuple(i for i in range(y.ndim) if i != c_ax))
  return y


def dense(p, h, sw=RW, sb=RB):
  w = p[0]
  y = float(sw / np.sqrt(w.shape[0])) * (h @ w)
  return y + sb * p[1] if len(p) > 1 else y


def flatten(h):
  return h.reshape(h.shape[0], -1)


def avg_pool(h, window, strides, padding, normalize_edges=False):
  """NT's AvgPool on NHWC: a zero-padded window sum divided by the window size,
  or (normalize_edges) by the number of non-padding entries in the window."""
  dims, st = (1,) + window + (1,), (1,) + strides + (1,)
  s = lax.reduce_window(h, 0., lax.add, dims, st, padding)
  if normalize_edges:
    return s / _window_counts(h.shape[1:-1], window, strides, padding)[None, ..., None]
  return s / math.prod(window)


def _window_counts(size, window, strides, padding):
  """NumPy count of the input entries inside each padded window (a constant)."""
  pads = lax.padtype_to_pads(size, window, strides, padding)
  counts = np.ones(())
  for n, w, s, (lo, hi) in zip(size, window, strides, pads):
    inside = np.pad(np.ones(n), (lo, hi))
    c = np.array([inside[o:o + w].sum() for o in range(0, len(inside) - w + 1, s)])
    counts = np.multiply.outer(counts, c)
  return counts


gap = lambda h: h.mean(axis=tuple(range(1, h.ndim - 1)))
relu = jax.nn.relu


def cw(f, cin, cout, bias=True):
  """Shapes of a conv layer's (filter, bias)."""
  return (tuple(f) + (cin, cout), (cout,)) if bias else (tuple(f) + (cin, cout),)


def dw(cin, cout, bias=True):
  return ((cin, cout), (cout,)) if bias else ((cin, cout),)


# ----------------------------------------------------------------------------
# The networks of make_conv_nt.py in plain JAX: name -> (apply_fn, shapes).
# Hidden width 4 is enough: with exact moments the kernel does not depend on it.


def _flatten_net(p, x):
  h = relu(conv(p['c1'], x))
  h = relu(conv(p['c2'], h))
  return dense(p['d'], flatten(h))


def _gap_net(p, x):
  h = relu(conv(p['c1'], x))
  h = relu(conv(p['c2'], h))
  return dense(p['d'], gap(h))


def _strided_net(p, x):
  h = relu(conv(p['c1'], x, strides=(2, 2)))
  h = relu(conv(p['c2'], h, strides=(1, 2), padding='VALID'))
  return dense(p['d'], flatten(h))


def _valid_net(p, x):
  h = relu(conv(p['c1'], x, padding='VALID'))
  h = relu(conv(p['c2'], h, padding='VALID'))
  return dense(p['d'], flatten(h))


def _avgpool_valid_net(p, x):
  h = relu(conv(p['c1'], x))
  h = avg_pool(h, (2, 2), (2, 2), 'VALID')
  h = relu(conv(p['c2'], h))
  return dense(p['d'], flatten(h))


def _avgpool_same_net(p, x):
  h = relu(conv(p['c1'], x))
  return dense(p['d'], flatten(avg_pool(h, (3, 3), (1, 1), 'SAME')))


def _avgpool_same_edges_net(p, x):
  h = relu(conv(p['c1'], x))
  return dense(p['d'], flatten(avg_pool(h, (3, 3), (2, 2), 'SAME', normalize_edges=True)))


def _erf_gelu_net(p, x):
  h = erf(conv(p['c1'], x))
  h = jax.nn.gelu(conv(p['c2'], h), approximate=False)
  return dense(p['d'], gap(h))


def _conv1d_net(p, x):
  h = relu(conv(p['c1'], x, dn=NWC))
  h = relu(conv(p['c2'], h, padding='VALID', dn=NWC))
  return dense(p['d'], gap(h))


def _wrn_block_net(p, x):
  h = conv(p['c0'], x)
  h = h + conv(p['c2'], relu(conv(p['c1'], relu(h))))
  return dense(p['d'], gap(relu(h)))


def _myrtle5_net(p, x):
  w = np.sqrt(2.0)
  c = functools.partial(conv, sw=w)
  h = relu(c(p['c1'], x))
  h = relu(c(p['c2'], h))
  h = avg_pool(h, (2, 2), (2, 2), 'VALID')
  h = avg_pool(relu(c(p['c3'], h)), (2, 2), (2, 2), 'VALID')
  h = avg_pool(relu(c(p['c4'], h)), (2, 2), (2, 2), 'VALID')
  return dense(p['d'], gap(h), sw=w)


_3x3 = (3, 3)
NT_NETS = {
    'flatten': (_flatten_net, dict(c1=cw(_3x3, 3, 4), c2=cw(_3x3, 4, 4), d=dw(100, 1))),
    'gap': (_gap_net, dict(c1=cw(_3x3, 3, 4), c2=cw((2, 3), 4, 4), d=dw(4, 1))),
    'strided': (_strided_net, dict(c1=cw(_3x3, 3, 4), c2=cw((2, 2), 4, 4), d=dw(8, 1))),
    'valid': (_valid_net, dict(c1=cw(_3x3, 3, 4), c2=cw((2, 2), 4, 4), d=dw(36, 1))),
    'avgpool_valid': (_avgpool_valid_net,
                      dict(c1=cw(_3x3, 3, 4), c2=cw((2, 2), 4, 4), d=dw(36, 1))),
    'avgpool_same': (_avgpool_same_net, dict(c1=cw(_3x3, 3, 4), d=dw(100, 1))),
    'avgpool_same_edges': (_avgpool_same_edges_net, dict(c1=cw(_3x3, 3, 4), d=dw(36, 1))),
    'erf_gelu': (_erf_gelu_net, dict(c1=cw(_3x3, 3, 4), c2=cw(_3x3, 4, 4), d=dw(4, 1))),
    'conv1d': (_conv1d_net, dict(c1=cw((3,), 3, 4), c2=cw((2,), 4, 4), d=dw(4, 1))),
    'wrn_block': (_wrn_block_net, dict(c0=cw(_3x3, 3, 4), c1=cw(_3x3, 4, 4),
                                       c2=cw(_3x3, 4, 4), d=dw(4, 1))),
    'myrtle5': (_myrtle5_net, dict(c1=cw(_3x3, 3, 4, False), c2=cw(_3x3, 4, 4, False),
                                   c3=cw(_3x3, 4, 4, False), c4=cw(_3x3, 4, 4, False),
                                   d=dw(4, 1, False))),
}


@pytest.fixture(scope='module')
def nt_ref():
  return dict(np.load(FIXTURE))


# Library bugs (the tests assert NT's numbers):
_XFAIL = {}
_SLOW = {'erf_gelu', 'myrtle5'}   # exact GELU by quadrature: ~30 s; myrtle5: ~15 s, its
                                  # layers are covered by the smaller networks


def _marked(name, xfail, slow):
  marks = [pytest.mark.slow] if name in slow else []
  if name in xfail:
    marks.append(pytest.mark.xfail(strict=True, reason=xfail[name]))
  return pytest.param(name, marks=marks)


def _nt_param(name):
  return _marked(name, _XFAIL, _SLOW)


@pytest.mark.parametrize('name', [_nt_param(n) for n in sorted(NT_NETS)])
def test_matches_neural_tangents(name, nt_ref):
  f, shapes = NT_NETS[name]
  kernel_fn = iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))
  x1, x2 = nt_ref[f'{name}/x1'], nt_ref[f'{name}/x2']
  for tag, b in (('12', x2), ('11', None)):
    k = kernel_fn(x1, b, ('nngp', 'ntk'))
    for g in ('nngp', 'ntk'):
      want = nt_ref[f'{name}/{g}_{tag}']
      np.testing.assert_allclose(getattr(k, g), want, rtol=RTOL_NT, atol=0,
                                 err_msg=f'{name} {g} ({tag})')


# ----------------------------------------------------------------------------
# Monte Carlo of finite CNNs.

WIDTH = 256        # hidden channels
C_OUT = 512        # logits: their NNGP is averaged within each draw (the readout noise)
C_NTK = 2          # logits whose empirical NTK is averaged (it concentrates)
N_MC = 32
K_SE = 4.0         # ≤ 16 correlated entries at 4 SE: a false alarm is < 1e-3 per check
C_WIDTH = 2.0      # finite-width bias ≤ c·L/n·max|K| (Hanin & Nica 2020), as for MLPs


def monte_carlo(apply_fn, shapes, x, n_samples=N_MC, seed=0, ntk=True):
  """Per-draw NNGP f fᵀ/C over the last (channel) axis, and empirical NTK."""
  ntk_fn = empirical_ntk_fn(lambda p, x: apply_fn(p, x)[..., :C_NTK])

  @jax.jit
  def one(p):
    f = apply_fn(p, x)
    c = 'abcdefgh'[:f.ndim - 2]
    C = 'ijklmnop'[:f.ndim - 2]
    nngp = jnp.einsum(f'x{c}z,y{C}z->xy' + ''.join(a + b for a, b in zip(c, C)), f, f)
    return nngp / f.shape[-1], (ntk_fn(x, None, p) if ntk else nngp)

  nngp, ntks = [], []
  for i in range(n_samples):
    k = one(draw(shapes, 1000 * seed + i + 1))
    nngp.append(k[0])
    ntks.append(k[1])
  return np.stack(nngp), np.stack(ntks)


def check_against_mc(analytic, draws, n_hidden, per_entry=True):
  mc_check.check_against_mc(analytic, draws, n_hidden, WIDTH, K_SE, C_WIDTH, per_entry)


NCHW = ('NCHW', 'OIHW', 'NCHW')
NDHWC = ('NDHWC', 'DHWIO', 'NDHWC')


def _nchw_net(p, x):           # x: (N, 3, 5, 5)
  h = relu(conv(p['c1'], x, dn=NCHW))
  h = relu(conv(p['c2'], h, dn=NCHW, padding='VALID'))
  return dense(p['d'], h.mean(axis=(2, 3)))


def _conv3d_net(p, x):         # x: (N, 4, 4, 4, 2)
  h = relu(conv(p['c1'], x, dn=NDHWC))
  h = relu(conv(p['c2'], h, dn=NDHWC, strides=(2, 2, 2), padding='VALID'))
  return dense(p['d'], gap(h))


def _lhs_dilation_net(p, x):   # transposed convolution: 4x4 -> 7x7
  h = relu(conv(p['c1'], x, padding=((1, 1), (1, 1)), lhs_dilation=(2, 2)))
  h = relu(conv(p['c2'], h))
  return dense(p['d'], gap(h))


def _rhs_dilation_net(p, x):
  h = relu(conv(p['c1'], x, rhs_dilation=(2, 2)))
  h = relu(conv(p['c2'], h, padding='VALID', rhs_dilation=(1, 2)))
  return dense(p['d'], flatten(h))


def _strided_same_net(p, x):   # 6x6, stride 2 SAME: padding (0, 1), asymmetric
  h = relu(conv(p['c1'], x, strides=(2, 2)))
  h = relu(conv(p['c2'], h))
  return dense(p['d'], flatten(h))


def _explicit_padding_net(p, x):
  h = relu(conv(p['c1'], x, padding=((2, 0), (0, 1))))
  h = relu(conv(p['c2'], h, padding=((0, 1), (1, 0))))
  return dense(p['d'], gap(h))


def _avg_pool_padding_net(p, x):   # flax-style window sum with zero padding
  h = relu(conv(p['c1'], x))
  h = lax.reduce_window(h, 0., lax.add, (1, 3, 3, 1), (1, 2, 2, 1),
                        ((0, 0), (1, 1), (1, 1), (0, 0))) / 9.
  h = relu(conv(p['c2'], h))
  return dense(p['d'], flatten(h))


def _residual_net(p, x):
  h = conv(p['c0'], x)
  h = h + conv(p['c1'], relu(h))       # a fresh filter: no cross term
  h = relu(h) + 0.5 * h                # correlated summands
  return dense(p['d'], gap(h))


def _correlated_sum_net(p, x):
  h = conv(p['c0'], x)
  h = relu(conv(p['c1'], relu(h) + 0.5 * h))   # correlated summands of one conv output
  return dense(p['d'], gap(h))


def _channel_concat_net(p, x):
  """Two branches of different widths concatenated along channels (Inception)."""
  h = jnp.concatenate([relu(conv(p['a'], x)), erf(conv(p['b'], x))], axis=-1)
  h = relu(conv(p['c2'], h))
  return dense(p['d'], gap(h))


W, O = WIDTH, C_OUT
MC_NETS = {
    'channel_concat': (_channel_concat_net, dict(a=cw((3, 3), 3, W), b=cw((1, 1), 3, W // 2),
                                                 c2=cw((2, 2), W + W // 2, W), d=dw(W, O)),
                       (4, 4, 3), 2),
    'nchw': (_nchw_net, dict(c1=((W, 3, 3, 3), (W,)), c2=((W, W, 2, 2), (W,)), d=dw(W, O)),
             (3, 5, 5), 2),
    'conv3d': (_conv3d_net, dict(c1=cw((3, 3, 3), 2, W), c2=cw((2, 2, 2), W, W), d=dw(W, O)),
               (4, 4, 4, 2), 2),
    'lhs_dilation': (_lhs_dilation_net, dict(c1=cw((3, 3), 3, W), c2=cw((3, 3), W, W),
                                             d=dw(W, O)), (4, 4, 3), 2),
    'rhs_dilation': (_rhs_dilation_net, dict(c1=cw((3, 3), 3, W), c2=cw((2, 2), W, W),
                                             d=dw(3 * 2 * W, O)), (4, 4, 3), 2),
    'strided_same': (_strided_same_net, dict(c1=cw((3, 3), 3, W), c2=cw((2, 2), W, W),
                                             d=dw(9 * W, O)), (6, 6, 3), 2),
    'explicit_padding': (_explicit_padding_net, dict(c1=cw((3, 3), 3, W), c2=cw((2, 2), W, W),
                                                     d=dw(W, O)), (4, 4, 3), 2),
    'avg_pool_padding': (_avg_pool_padding_net, dict(c1=cw((3, 3), 3, W), c2=cw((2, 2), W, W),
                                                     d=dw(9 * W, O)), (5, 5, 3), 2),
    'correlated_sum': (_correlated_sum_net, dict(c0=cw((3, 3), 3, W), c1=cw((3, 3), W, W),
                                                 d=dw(W, O)), (4, 4, 3), 2),
    'residual': (_residual_net, dict(c0=cw((3, 3), 3, W), c1=cw((3, 3), W, W), d=dw(W, O)),
                 (4, 4, 3), 2),
}
_MC_XFAIL = {}
# 15-70 s each; padded pooling is also checked against NT in the default run,
# correlated branches by the 'residual' case.
_MC_SLOW = {'conv3d', 'avg_pool_padding', 'correlated_sum'}


def _mc_param(name):
  return _marked(name, _MC_XFAIL, _MC_SLOW)


def _x(shape, n=3, seed=5):
  return 0.9 * jax.random.normal(jax.random.PRNGKey(seed), (n,) + shape)


@pytest.mark.parametrize('name', [_mc_param(n) for n in sorted(MC_NETS)])
def test_matches_monte_carlo(name):
  f, shapes, in_shape, n_hidden = MC_NETS[name]
  x = _x(in_shape)
  k = iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))(x, None, ('nngp', 'ntk'))
  nngp, ntk = monte_carlo(f, shapes, x)
  check_against_mc(k.nngp, nngp, n_hidden)
  check_against_mc(k.ntk, ntk, n_hidden)


# ----------------------------------------------------------------------------
# Spatial outputs: a fully convolutional network, kernel (N1, N2, H, H', W, W').


def _fully_conv(p, x):
  h = relu(conv(p['c1'], x))
  return conv(p['c2'], h, padding=((1, 0), (0, 1)))


FC_SHAPES = dict(c1=cw((3, 3), 3, WIDTH), c2=cw((2, 2), WIDTH, C_OUT))


def _flat_spatial(k):
  """(N1, N2, H, H', W, W') → (N1·H·W, N2·H'·W')."""
  n1, n2, h, h2, w, w2 = k.shape
  return np.asarray(k).transpose(0, 2, 4, 1, 3, 5).reshape(n1 * h * w, n2 * h2 * w2)


def test_spatial_output_kernel_is_psd_per_input():
  x = _x((4, 4, 3), n=3)
  k = iw.kernelize(_fully_conv, draw(FC_SHAPES, 0), param_stats=unit_stats(FC_SHAPES))(
      x, None, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    kg = np.asarray(getattr(k, g))
    assert kg.shape == (3, 3, 4, 4, 4, 4)
    for i in range(3):
      block = _flat_spatial(kg[i:i + 1, i:i + 1])
      np.testing.assert_allclose(block, block.T, rtol=0, atol=1e-13 * np.abs(block).max())
      assert np.linalg.eigvalsh(block).min() > -1e-12 * np.abs(block).max()
    full = _flat_spatial(kg)
    np.testing.assert_allclose(full, full.T, rtol=0, atol=1e-13 * np.abs(full).max())
    assert np.linalg.eigvalsh(full).min() > -1e-12 * np.abs(full).max()
    # Not trivially diagonal: neighbouring pixels are correlated through the filters.
    assert np.abs(kg[0, 0, 0, 1, 0, 0]) > 0.05 * kg[0, 0, 0, 0, 0, 0]


@pytest.mark.slow
def test_spatial_output_kernel_matches_monte_carlo():
  x = _x((4, 4, 3), n=2)
  k = iw.kernelize(_fully_conv, draw(FC_SHAPES, 0), param_stats=unit_stats(FC_SHAPES))(
      x, None, ('nngp', 'ntk'))
  nngp, ntk = monte_carlo(_fully_conv, FC_SHAPES, x)
  assert ntk.shape[1:] == k.ntk.shape
  for a, d in ((k.nngp, nngp), (k.ntk, ntk)):
    check_against_mc(_flat_spatial(a), np.stack([_flat_spatial(e) for e in d]), 1,
                     per_entry=False)


# ----------------------------------------------------------------------------
# Flax linen against the same network in plain JAX with copied parameters.


def test_flax_linen_cnn_equals_plain_jax():
  nn = pytest.importorskip('flax.linen')

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (3, 3), padding='SAME')(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(nn.Conv(16, (2, 2), padding='SAME')(x))
      return nn.Dense(3)(x.mean(axis=(1, 2)))

  x = _x((6, 6, 3), n=3)
  model = CNN()
  variables = model.init(jax.random.PRNGKey(0), x)
  # Nonzero biases, so that they enter the kernel.
  variables = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(1), a.shape),
                           variables)
  pp = variables['params']
  plain = {'c1': (pp['Conv_0']['kernel'], pp['Conv_0']['bias']),
           'c2': (pp['Conv_1']['kernel'], pp['Conv_1']['bias']),
           'd': (pp['Dense_0']['kernel'], pp['Dense_0']['bias'])}

  def plain_fn(p, x):
    c = lambda q, h: lax.conv_general_dilated(h, q[0], (1, 1), 'SAME',
                                              dimension_numbers=NHWC) + q[1]
    h = relu(c(p['c1'], x))
    h = lax.reduce_window(h, 0., lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4.
    h = relu(c(p['c2'], h))
    return h.mean(axis=(1, 2)) @ p['d'][0] + p['d'][1]

  np.testing.assert_allclose(model.apply(variables, x), plain_fn(plain, x), rtol=1e-12)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # small-sample moment estimates, the same on both sides
    kf = iw.kernelize(model.apply, variables)(x, None, ('nngp', 'ntk'))
    kp = iw.kernelize(plain_fn, plain)(x, None, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    np.testing.assert_allclose(getattr(kf, g), getattr(kp, g), rtol=1e-10, atol=0)
  assert np.abs(np.asarray(kp.nngp)).min() > 0


# ----------------------------------------------------------------------------
# Symmetry, PSD, jit, float32.

_POOL_NET, _POOL_SHAPES = NT_NETS['avgpool_valid']


def _pool_kernel_fn(dtype=np.float64):
  return iw.kernelize(_POOL_NET, draw(_POOL_SHAPES, 0, dtype), param_stats=unit_stats(_POOL_SHAPES))


def test_kernel_symmetric_psd_and_jit():
  x = _x((6, 6, 3), n=4)
  kernel_fn = _pool_kernel_fn()
  k = kernel_fn(x, None, ('nngp', 'ntk'))
  kj = jax.jit(kernel_fn, static_argnames='get')(x, None, ('nngp', 'ntk'))
  k12 = kernel_fn(x, x[1:3], ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    a = np.asarray(getattr(k, g))
    np.testing.assert_allclose(a, a.T, rtol=0, atol=1e-14 * np.abs(a).max())
    assert np.linalg.eigvalsh(a).min() > -1e-12 * np.abs(a).max()
    assert np.linalg.eigvalsh(a).max() > 0
    np.testing.assert_allclose(getattr(kj, g), a, rtol=1e-12, atol=0)
    # The cross kernel with x2 is the corresponding block of the x1 = x2 kernel.
    np.testing.assert_allclose(getattr(k12, g), a[:, 1:3], rtol=1e-12, atol=0)


def test_float32_close_to_float64():
  x = _x((6, 6, 3), n=4)
  k64 = _pool_kernel_fn()(x, None, ('nngp', 'ntk'))
  k32 = _pool_kernel_fn(np.float32)(x.astype(np.float32), None, ('nngp', 'ntk'))
  for g in ('nngp', 'ntk'):
    a32 = getattr(k32, g)
    assert a32.dtype == np.float32
    # float32 rounding (eps 6e-8) through three layers and arccos: measured ~1e-6.
    np.testing.assert_allclose(a32, getattr(k64, g), rtol=2e-5,
                               atol=2e-5 * np.abs(getattr(k64, g)).max())


# ----------------------------------------------------------------------------
# Errors.


def test_max_pool_over_channels_is_unsupported_and_named():
  """Max pooling along the channel axis has no infinite-width limit (spatial
  max pooling does: tests/test_max_pool.py)."""
  def f(p, x):
    h = relu(conv(p['c1'], x))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 2), (1, 2, 2, 2), 'VALID')
    return dense(p['d'], flatten(h))

  shapes = dict(c1=cw((3, 3), 3, 4), d=dw(8, 1))
  kernel_fn = iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))
  with pytest.raises(iw.UnsupportedPrimitiveError, match='channel') as e:
    kernel_fn(_x((4, 4, 3), n=2), None, 'nngp')
  assert 'reduce_window_max' in str(e.value.primitive)


def test_grouped_convolution_raises_clear_error():
  def f(p, x):
    h = relu(conv(p['c1'], x))
    h = lax.conv_general_dilated(h, p['c2'][0], (1, 1), 'SAME', dimension_numbers=NHWC,
                                 feature_group_count=2)
    return dense(p['d'], gap(h))

  shapes = dict(c1=cw((3, 3), 3, 4), c2=((3, 3, 2, 4),), d=dw(4, 1))
  kernel_fn = iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))
  with pytest.raises(iw.InfwidthError, match='feature_group_count') as e:
    kernel_fn(_x((4, 4, 3), n=2), None, 'nngp')
  assert 'conv_general_dilated' in str(e.value)


# ----------------------------------------------------------------------------
# Dimension numbers only relabel axes: the kernel (in NT's (N1, N2, H, H', W, W')
# layout for spatial outputs) is the same for every layout.

_LAYOUTS = {
    'nhwc': (NHWC, NHWC),
    'nchw': (('NCHW', 'OIHW', 'NCHW'), ('NCHW', 'OIHW', 'NCHW')),
    'mixed': (('NCHW', 'OHWI', 'NHWC'), ('NHWC', 'IHWO', 'NWHC')),
}


def _layout_net(layout, readout):
  dn1, dn2 = _LAYOUTS[layout]

  def f(p, x):
    if dn1[0] == 'NCHW':
      x = jnp.transpose(x, (0, 3, 1, 2))
    h = relu(conv(p['c1'], x, dn=dn1, strides=(1, 2)))
    h = conv(p['c2'], h, dn=dn2, padding=((1, 0), (0, 1)))
    # Back to NHWC so that Flatten orders the pixels the same way.
    h = jnp.transpose(h, [dn2[2].index(c) for c in 'NHWC'])
    return dense(p['d'], flatten(h)) if readout else h

  def filt(dn, kh, kw, i, o):
    return tuple({'H': kh, 'W': kw, 'I': i, 'O': o}[c] for c in dn[1])

  shapes = dict(c1=(filt(dn1, 3, 3, 3, 4), (4,)), c2=(filt(dn2, 2, 2, 4, 5), (5,)),
                d=((4 * 3 * 5, 1), (1,)))
  return f, shapes


@pytest.mark.parametrize('readout', [pytest.param(False, marks=pytest.mark.slow), True])
def test_dimension_numbers_do_not_change_the_kernel(readout):
  x = _x((4, 5, 3), n=2)
  ks = {}
  for layout in _LAYOUTS:
    f, shapes = _layout_net(layout, readout)
    ks[layout] = iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))(
        x, x[:1], ('nngp', 'ntk'))
  want_shape = (2, 1) if readout else (2, 1, 4, 4, 3, 3)
  for layout, k in ks.items():
    for g in ('nngp', 'ntk'):
      assert getattr(k, g).shape == want_shape, (layout, g)
      np.testing.assert_allclose(getattr(k, g), getattr(ks['nhwc'], g), rtol=1e-12, atol=0,
                                 err_msg=f'{layout} {g}')


# ----------------------------------------------------------------------------
# Pooling a whole spatial axis: reduce_sum (mean, or sum with keepdims) and a
# window sum spanning the axis are the same linear map.


def _pool_h(kind):
  def f(p, x):
    h = relu(conv(p['c1'], x))
    if kind == 'mean':
      h = h.mean(axis=1)
    elif kind == 'sum_keepdims':
      h = jnp.sum(h, axis=1, keepdims=True) / h.shape[1]
    else:
      h = lax.reduce_window(h, 0., lax.add, (1, h.shape[1], 1, 1), (1, 1, 1, 1), 'VALID')
      h = h / x.shape[1]
    return dense(p['d'], flatten(h))
  return f


@pytest.mark.parametrize('kind', [
    'sum_keepdims',
    'window'])
def test_pooling_a_whole_axis_three_ways(kind):
  x = _x((4, 5, 3), n=2)
  shapes = dict(c1=cw((3, 3), 3, 4), d=dw(5 * 4, 1))
  kern = lambda f: iw.kernelize(f, draw(shapes, 0), param_stats=unit_stats(shapes))(
      x, None, ('nngp', 'ntk'))
  want, got = kern(_pool_h('mean')), kern(_pool_h(kind))
  for g in ('nngp', 'ntk'):
    np.testing.assert_allclose(getattr(got, g), getattr(want, g), rtol=1e-12, atol=0)
