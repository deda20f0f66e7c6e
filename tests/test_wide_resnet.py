"""NT README's WideResnet in plain JAX and in Flax linen has the kernel of the
same network in `infwidth.stax` (whose full-size kernel matches NT 0.6.5 in
`test_stax.py::test_wide_resnet`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import infwidth as iw
from infwidth import stax

H = 8             # input size; the two strided groups leave H/4
BLOCKS, K = 2, 1  # block_size and widening factor (NT's README: 4 and 1)
X1 = jax.random.normal(jax.random.PRNGKey(0), (3, H, H, 3))
X2 = jax.random.normal(jax.random.PRNGKey(1), (2, H, H, 3))


def stax_wrn():
  def block(c, strides=(1, 1), mismatch=False):
    main = stax.serial(stax.Relu(), stax.Conv(c, (3, 3), strides, padding='SAME'),
                       stax.Relu(), stax.Conv(c, (3, 3), padding='SAME'))
    short = stax.Conv(c, (3, 3), strides, padding='SAME') if mismatch else stax.Identity()
    return stax.serial(stax.FanOut(2), stax.parallel(main, short), stax.FanInSum())

  def group(n, c, strides=(1, 1)):
    return stax.serial(block(c, strides, True), *[block(c) for _ in range(n - 1)])

  return stax.serial(stax.Conv(16, (3, 3), padding='SAME'), group(BLOCKS, 16 * K),
                     group(BLOCKS, 32 * K, (2, 2)), group(BLOCKS, 64 * K, (2, 2)),
                     stax.AvgPool((H // 4, H // 4)), stax.Flatten(), stax.Dense(10, 1., 0.))[2]


# Plain JAX: weights N(0, 1), scaled by 1/sqrt(fan_in) (NT parameterisation, W_std = 1).

def conv(w, x, strides=(1, 1)):
  y = lax.conv_general_dilated(x, w, strides, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y / np.sqrt(np.prod(w.shape[:3]))


def plain_wrn(p, x):
  x = conv(p['stem'], x)
  for g, blocks in enumerate(p['groups']):
    for i, b in enumerate(blocks):
      strides = (2, 2) if g > 0 and i == 0 else (1, 1)
      h = conv(b['c1'], jax.nn.relu(x), strides)
      h = conv(b['c2'], jax.nn.relu(h))
      x = h + (conv(b['short'], x, strides) if 'short' in b else x)
  x = lax.reduce_window(x, 0., lax.add, (1, H // 4, H // 4, 1), (1, H // 4, H // 4, 1), 'VALID')
  x = (x / (H // 4) ** 2).reshape(x.shape[0], -1)
  return x @ p['dense'] / np.sqrt(x.shape[-1])


def plain_shapes():
  groups, cin = [], 16
  for c in (16 * K, 32 * K, 64 * K):
    blocks = []
    for i in range(BLOCKS):
      b = dict(c1=(3, 3, cin, c), c2=(3, 3, c, c))
      if i == 0:
        b['short'] = (3, 3, cin, c)
      blocks.append(b)
      cin = c
    groups.append(blocks)
  return dict(stem=(3, 3, 3, 16), groups=groups, dense=(64 * K, 10))


# Flax linen, the same network.

class Conv(nn.Module):
  features: int
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.features, (3, 3), self.strides, padding='SAME', use_bias=False,
                kernel_init=nn.initializers.normal(1.0))(x)
    return y / np.sqrt(9 * x.shape[-1])


class Block(nn.Module):
  features: int
  strides: tuple = (1, 1)
  mismatch: bool = False

  @nn.compact
  def __call__(self, x):
    h = Conv(self.features, self.strides)(nn.relu(x))
    h = Conv(self.features)(nn.relu(h))
    return h + (Conv(self.features, self.strides)(x) if self.mismatch else x)


class WideResnet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Conv(16)(x)
    for c, strides in ((16 * K, (1, 1)), (32 * K, (2, 2)), (64 * K, (2, 2))):
      x = Block(c, strides, True)(x)
      for _ in range(BLOCKS - 1):
        x = Block(c)(x)
    x = nn.avg_pool(x, (H // 4, H // 4), (H // 4, H // 4)).reshape(x.shape[0], -1)
    return nn.Dense(10, use_bias=False, kernel_init=nn.initializers.normal(1.0))(x) / np.sqrt(
        x.shape[-1])


def unit_stats(params):
  return jax.tree_util.tree_map(lambda _: iw.ParamStats(0., 1.), params)


def test_plain_jax_and_flax_wide_resnets_have_the_stax_kernel():
  want = jax.jit(stax_wrn(), static_argnames='get')(X1, X2, ('nngp', 'ntk'))
  shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float64), plain_shapes(),
                                  is_leaf=lambda s: isinstance(s, tuple) and all(
                                      isinstance(i, int) for i in s))
  plain = iw.kernelize(plain_wrn, shapes, param_stats=unit_stats(shapes))
  model = WideResnet()
  params = model.init(jax.random.PRNGKey(2), X1)
  flax = iw.kernelize(model.apply, params, param_stats=unit_stats(params))
  for kernel_fn in (plain, flax):
    got = jax.jit(kernel_fn, static_argnames='get')(X1, X2, ('nngp', 'ntk'))
    for g in ('nngp', 'ntk'):
      np.testing.assert_allclose(getattr(got, g), getattr(want, g), rtol=1e-10)
  assert np.abs(want.ntk).max() > 0.1
