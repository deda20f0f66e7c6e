"""Kernels of blocks from real models, per kernel entry, next to the plain block.

MLP blocks (784 features, width 512, N=256, float32, jitted `kernel_fn(x, x,
('nngp', 'ntk'))`): the plain ReLU block, a GLU `(W_a x)·σ(W_g x)` and a
SwiGLU `silu(W_a x)·(W_g x)` (products of independent values: moments that
factorise), and a product of correlated values (a shared bias: a chain of two
Gaussians integrated exactly). Each with a dense readout.

A ResNet block on 8×8 images (a 3×3 stem convolution to width 64, then
conv–BN–relu–conv–BN plus the shortcut, global average pooling and a dense
readout; BatchNorm in inference with trained-looking running statistics,
mean ~ N(0.3, 0.2²) and variance ~ U(0.5, 2) per channel, scale 1, bias 0),
next to the same block without BatchNorm: the statistics are per-channel
arrays with distinct entries, so the moments after them are averages over the
64 channels (docs/semantics.md).

Run: python benchmarks/bench_real_blocks.py [--reps 5] [--n 256] [--n-images 8]
     [--only mlp|resnet]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from timing import best_time

D, WIDTH = 784, 512


def dense(p, h):
  w, b = p
  return h @ w / np.sqrt(w.shape[0]) + 0.1 * b


def plain(p, x):
  return dense(p['o'], jax.nn.relu(dense(p['a'], x)))


def glu(p, x):
  return dense(p['o'], dense(p['a'], x) * jax.nn.sigmoid(dense(p['g'], x)))


def swiglu(p, x):
  return dense(p['o'], jax.nn.silu(dense(p['a'], x)) * dense(p['g'], x))


def shared_bias(p, x):
  b = p['a'][1]
  return dense(p['o'], (x @ p['a'][0] / np.sqrt(D) + b) * (x @ p['g'][0] / np.sqrt(D) + b))


BLOCKS = {'plain relu': plain, 'GLU': glu, 'SwiGLU': swiglu, 'correlated product': shared_bias}


# ----------------------------------------------------------------------------
# A BatchNorm ResNet block.

IMG, CH, RES_WIDTH, EPS = 8, 3, 64, 1e-5


def conv(p, h):
  w, b = p
  fan_in = w.shape[0] * w.shape[1] * w.shape[2]
  out = jax.lax.conv_general_dilated(h, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return out / np.sqrt(fan_in) + 0.1 * b


def _running_stats(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(0.3, 0.2, RES_WIDTH).astype(np.float32),
          rng.uniform(0.5, 2.0, RES_WIDTH).astype(np.float32))


STATS_1, STATS_2 = _running_stats(1), _running_stats(2)


def batch_norm(p, h, stats):
  mean, var = stats
  scale, bias = p
  return (h - mean) / np.sqrt(var + EPS) * scale + bias


def resnet_block(p, x, bn=True):
  norm = (lambda q, h, st: batch_norm(q, h, st)) if bn else (lambda q, h, st: h)
  h = conv(p['stem'], x)
  y = jax.nn.relu(norm(p['bn1'], conv(p['c1'], h), STATS_1))
  y = norm(p['bn2'], conv(p['c2'], y), STATS_2) + h
  return dense(p['o'], jnp.mean(y, axis=(1, 2)))


RESNET_BLOCKS = {'ResNet block': lambda p, x: resnet_block(p, x, bn=False),
                 'ResNet block + BN': resnet_block}


def _resnet_params():
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  conv_p = lambda cin: (f32(3, 3, cin, RES_WIDTH), f32(RES_WIDTH))
  params = {'stem': conv_p(CH), 'c1': conv_p(RES_WIDTH), 'c2': conv_p(RES_WIDTH),
            'bn1': (f32(RES_WIDTH), f32(RES_WIDTH)), 'bn2': (f32(RES_WIDTH), f32(RES_WIDTH)),
            'o': (f32(RES_WIDTH, 10), f32(10))}
  stats = jax.tree.map(lambda _: iw.ParamStats(0., 1.), params)
  for k in ('bn1', 'bn2'):
    stats[k] = (iw.ParamStats(1., 0.), iw.ParamStats(0., 0.))
  return params, stats


def _params():
  shape = lambda a, b: (jax.ShapeDtypeStruct((a, b), jnp.float32),
                        jax.ShapeDtypeStruct((b,), jnp.float32))
  params = {'a': shape(D, WIDTH), 'g': shape(D, WIDTH), 'o': shape(WIDTH, 10)}
  stats = jax.tree.map(lambda _: iw.ParamStats(0., 1.), params)
  return params, stats


def _run(blocks, params, stats, x, n, reps, gets=(('nngp', 'ntk'),)):
  for get in gets:
    base = None
    for name, fn in blocks.items():
      kf = jax.jit(iw.kernelize(fn, params, param_stats=stats), static_argnums=2)
      t = best_time(lambda a: kf(a, a, get), x, reps=reps)
      base = base or t
      per_entry = 1e9 * t / n ** 2
      label = name if len(gets) == 1 else f'{name} ({"+".join(get) if isinstance(get, tuple) else get})'
      print(f'  {label:28s} {1e3 * t:10.2f} ms  {per_entry:12.1f} ns/entry  '
            f'{t / base:8.2f}x plain')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--n', type=int, default=256)
  parser.add_argument('--n-images', type=int, default=8)
  parser.add_argument('--only', choices=('mlp', 'resnet'), default=None)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  if args.only != 'resnet':
    x = jnp.asarray(rng.normal(size=(args.n, D)).astype(np.float32))
    params, stats = _params()
    print(f'N={args.n}, {D} features, width {WIDTH}, float32, jitted, best of {args.reps}')
    _run(BLOCKS, params, stats, x, args.n, args.reps)
  if args.only != 'mlp':
    n = args.n_images
    x = jnp.asarray(rng.normal(size=(n, IMG, IMG, CH)).astype(np.float32))
    params, stats = _resnet_params()
    print(f'N={n} images {IMG}x{IMG}x{CH}, width {RES_WIDTH}, float32, jitted, '
          f'best of {args.reps}')
    _run(RESNET_BLOCKS, params, stats, x, n, args.reps, gets=('nngp', ('nngp', 'ntk')))


if __name__ == '__main__':
  main()
