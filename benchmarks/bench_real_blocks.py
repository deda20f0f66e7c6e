"""Kernels of blocks from real models, per kernel entry, next to the plain block.

MLP blocks (784 features, width 512, N=256, float32, jitted `kernel_fn(x, x,
('nngp', 'ntk'))`): the plain ReLU block, a GLU `(W_a x)·σ(W_g x)` and a
SwiGLU `silu(W_a x)·(W_g x)` (products of independent values: moments that
factorise), and a product of correlated values (a shared bias: a chain of two
Gaussians integrated exactly). Each with a dense readout.

Run: python benchmarks/bench_real_blocks.py [--reps 5] [--n 256]
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


def _params():
  shape = lambda a, b: (jax.ShapeDtypeStruct((a, b), jnp.float32),
                        jax.ShapeDtypeStruct((b,), jnp.float32))
  params = {'a': shape(D, WIDTH), 'g': shape(D, WIDTH), 'o': shape(WIDTH, 10)}
  stats = jax.tree.map(lambda _: iw.ParamStats(0., 1.), params)
  return params, stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--n', type=int, default=256)
  args = parser.parse_args()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(args.n, D)).astype(np.float32))
  params, stats = _params()
  print(f'N={args.n}, {D} features, width {WIDTH}, float32, jitted, best of {args.reps}')
  base = None
  for name, fn in BLOCKS.items():
    kf = jax.jit(iw.kernelize(fn, params, param_stats=stats), static_argnums=2)
    t = best_time(lambda a: kf(a, a, ('nngp', 'ntk')), x, reps=args.reps)
    base = base or t
    per_entry = 1e9 * t / args.n ** 2
    print(f'  {name:20s} {1e3 * t:8.2f} ms  {per_entry:8.1f} ns/entry  {t / base:5.2f}x plain')


if __name__ == '__main__':
  main()
