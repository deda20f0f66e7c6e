"""Spatial kernels computed on blocks of input pairs equal the kernels computed
at once: values, `Kernel` fields, symmetry detection and derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import infwidth as iw
from infwidth.domain import pair_blocks

H, C0, C = 4, 2, 8


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def body(p, x):
  h = jax.nn.relu(conv(x, p['c1']) / np.sqrt(9 * C0) + 0.1 * p['b1'])
  return jax.nn.relu(conv(h, p['c2']) / np.sqrt(9 * C))


READOUTS = {
    'flatten': lambda p, h: h.reshape(h.shape[0], -1) @ p['r_flat'] / np.sqrt(H * H * C),
    'pool': lambda p, h: h.mean((1, 2)) @ p['r_pool'] / np.sqrt(C),
    'spatial_output': lambda p, h: conv(h, p['c3']) / np.sqrt(9 * C),
}
SHAPES = dict(c1=(3, 3, C0, C), b1=(C,), c2=(3, 3, C, C), c3=(3, 3, C, 3),
              r_flat=(H * H * C, 5), r_pool=(C, 5))
PARAMS = {k: jax.ShapeDtypeStruct(s, jnp.float64) for k, s in SHAPES.items()}
STATS = {k: iw.ParamStats(0., 1.) for k in SHAPES}
X = jax.random.normal(jax.random.PRNGKey(0), (19, H, H, C0))
Y = jax.random.normal(jax.random.PRNGKey(1), (11, H, H, C0))


def kernel_fn(readout):
  return iw.kernelize(lambda p, x: READOUTS[readout](p, body(p, x)), PARAMS, param_stats=STATS)


@pytest.fixture
def unblocked(monkeypatch):
  """Runs a thunk with blocking switched off."""
  def run(thunk):
    with monkeypatch.context() as m:
      m.setattr(pair_blocks, 'block_rows', lambda *a: None)
      return thunk()
  return run


@pytest.fixture
def small_blocks(monkeypatch):
  # 8-row blocks for these small kernels: 19 rows are 3 blocks, the last padded.
  monkeypatch.setattr(pair_blocks, 'TARGET_BLOCK_ENTRIES', 1)


def fields(k):
  return [k.nngp, k.ntk, k.cov1] + ([] if k.cov2 is None else [k.cov2])


@pytest.mark.parametrize('readout', list(READOUTS))
@pytest.mark.parametrize('x2', ['none', 'same_values', 'other'])
def test_blocked_equals_unblocked(readout, x2, unblocked, small_blocks):
  kf = kernel_fn(readout)
  args = {'none': (X,), 'same_values': (X, X + 0.), 'other': (X, Y)}[x2]
  blocked = jax.jit(kf)(*args)
  whole = unblocked(lambda: jax.jit(kf)(*args))
  assert pair_blocks.block_rows(19, 19, H * H) == 8
  assert blocked.x1_is_x2 == whole.x1_is_x2 and blocked.shape1 == whole.shape1
  assert blocked.shape2 == whole.shape2 and blocked.nngp.shape == whole.nngp.shape
  for b, w in zip(fields(blocked), fields(whole)):
    np.testing.assert_allclose(b, w, rtol=1e-12, atol=1e-14)
  if x2 != 'other':
    swap = (1, 0) + tuple(np.arange(2, blocked.ntk.ndim).reshape(-1, 2)[:, ::-1].ravel())
    np.testing.assert_allclose(blocked.ntk, jnp.transpose(blocked.ntk, swap), rtol=1e-12)


def test_equal_inputs_are_detected_at_run_time(monkeypatch, small_blocks):
  """With x2 equal to x1 (a different array), only the 6 blocks on and above
  the diagonal of the 3x3 grid are computed; with other values all 9."""
  runs = []
  blocks = pair_blocks._blocks

  def counting(pair_fn, *a, **kw):
    def counted(x1, x2):
      jax.debug.callback(lambda: runs.append(1))
      return pair_fn(x1, x2)
    return blocks(counted, *a, **kw)
  monkeypatch.setattr(pair_blocks, '_blocks', counting)
  kf = jax.jit(kernel_fn('pool'))
  k_none = jax.block_until_ready(kf(X))
  assert len(runs) == 6
  runs.clear()
  k_same = jax.block_until_ready(kf(X, X + 0.))
  assert len(runs) == 6
  np.testing.assert_allclose(k_same.ntk, k_none.ntk, rtol=1e-12)
  runs.clear()
  k_other = jax.block_until_ready(kf(X, X.at[0].add(1.)))
  assert len(runs) == 9
  assert not np.allclose(k_other.ntk[0], k_same.ntk[0])
  np.testing.assert_allclose(k_other.ntk[1:, 1:], k_same.ntk[1:, 1:], rtol=1e-12)


@pytest.mark.parametrize('x2', ['none', 'same_values'])
def test_derivatives_are_those_of_the_whole_computation(x2, unblocked, small_blocks):
  """The partial derivative in x1 at x1 == x2 is not the symmetric one."""
  kf = kernel_fn('pool')
  w = jax.random.normal(jax.random.PRNGKey(2), (19, 19))
  if x2 == 'none':
    loss = lambda x1: jnp.sum(w * kf(x1, None, 'ntk'))
  else:
    loss = lambda x1: jnp.sum(w * kf(x1, X, 'ntk'))
  g = jax.jit(jax.grad(loss))(X)
  g_whole = unblocked(lambda: jax.jit(jax.grad(loss))(X))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, g_whole, rtol=1e-9, atol=1e-12)


def test_block_rows():
  assert pair_blocks.block_rows(2048, 2048, 1) is None  # no spatial structure
  assert pair_blocks.block_rows(16, 16, 8 ** 4) == 8   # 8x8 images, full blocks
  assert pair_blocks.block_rows(64, 64, 32 * 32) == 16  # 32x32 images, pixel diagonals
  assert pair_blocks.block_rows(8, 8, 32 * 32) is None  # one block
