"""Where kernelize's time goes, for the two kernelize benchmarks.

MLP (the 3-hidden-layer ReLU MLP of bench_kernelize_mlp.py, 2048x784, float32):
the input Gram matrix alone, `get='nngp'`, `get='ntk'`, both, and both with
x2=None. CNN (the 21-layer networks of bench_kernelize_cnn.py): the kernel
computed at once and on blocks of input pairs of several sizes.

Run: python benchmarks/bench_kernelize_parts.py [--parts mlp,cnn] [--reps 5]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from timing import best_time


def mlp_parts(reps):
  import infwidth as iw
  from bench_kernelize_mlp import WIDTHS, mlp
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 784)).astype(np.float32))
  dims = (x.shape[1],) + WIDTHS + (10,)
  params = [(jax.ShapeDtypeStruct((a, b), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32))
            for a, b in zip(dims[:-1], dims[1:])]
  stats = [(iw.ParamStats(0., 1.), iw.ParamStats(0., 1.)) for _ in params]
  kf = iw.kernelize(mlp, params, param_stats=stats)
  print('[mlp] N=2048, 784 features, float32; best of', reps)
  cases = [('input Gram matrix x @ x.T', lambda a, b: a @ b.T),
           ("get='nngp'", lambda a, b: kf(a, b, 'nngp')),
           ("get='ntk'", lambda a, b: kf(a, b, 'ntk')),
           ("get=('nngp', 'ntk')", lambda a, b: kf(a, b, ('nngp', 'ntk'))),
           ("get=('nngp', 'ntk'), x2=None", lambda a, b: kf(a, None, ('nngp', 'ntk')))]
  for name, fn in cases:
    print(f'  {name:32s} {1e3 * best_time(jax.jit(fn), x, x, reps=reps):7.1f} ms')


def cnn_parts(reps):
  from bench_kernelize_cnn import CASES, infwidth_kernel_fn
  from infwidth.domain import pair_blocks
  chosen = pair_blocks.block_rows
  for readout, (size, n) in CASES.items():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32))
    print(f'[{readout}] N={n}, {size}x{size}x3, depth 21, float32; best of {reps}')
    settings = [('at once', lambda *a: None), ('blocks chosen by kernelize', chosen)]
    settings += [(f'blocks of {r} rows', lambda n1, n2, e, r=r: r if r < n else None)
                 for r in (4, 8, 16, 32) if r < n]
    try:
      for name, rule in settings:
        pair_blocks.block_rows = rule
        fn = infwidth_kernel_fn(readout, 21, 3)
        t = best_time(lambda a: fn(a, a, ('nngp', 'ntk')), x, reps=reps)
        print(f'  {name:28s} {1e3 * t:7.1f} ms')
    finally:
      pair_blocks.block_rows = chosen


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--parts', default='mlp,cnn')
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  parts = args.parts.split(',')
  if 'mlp' in parts:
    mlp_parts(args.reps)
  if 'cnn' in parts:
    cnn_parts(args.reps)


if __name__ == '__main__':
  main()
