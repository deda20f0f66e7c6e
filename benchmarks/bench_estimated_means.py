"""Kernels from sampled parameters (moments estimated) against exact moments.

The 3-hidden-layer ReLU MLP (widths 512, 784 features, float32) with its
parameters passed as sampled arrays and no `param_stats`, next to the same
network with exact `param_stats`, jitted `kernel_fn(x, x, ('nngp', 'ntk'))`,
best of `--reps` calls. Estimated bias means within 3 standard errors of 0 are
taken as 0, so both take the closed-form (arc-cosine) path. A third row gives
the biases a significant mean (5): non-centred ReLUs, whose closed forms go
through the bivariate normal CDF.

Run: python benchmarks/bench_estimated_means.py [--reps 5] [--sizes 256,2048]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from timing import best_time

WIDTHS = (512, 512, 512)


def mlp(params, x):
  for i, (w, b) in enumerate(params):
    x = x @ w / np.sqrt(w.shape[0]) + 0.1 * b
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--sizes', default='256,2048')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  dims = (784,) + WIDTHS + (10,)
  params = [(jnp.asarray(rng.standard_normal((a, b)), jnp.float32),
             jnp.asarray(rng.standard_normal(b), jnp.float32))
            for a, b in zip(dims[:-1], dims[1:])]
  stats = [(iw.ParamStats(0., 1.), iw.ParamStats(0., 1.)) for _ in params]
  for n in (int(s) for s in args.sizes.split(',')):
    x = jnp.asarray(rng.standard_normal((n, 784)), jnp.float32)
    times = {}
    # Bias means of 5 (significant): non-centred ReLUs, closed forms through Φ₂.
    shifted = [(w, iw.ParamStats(5., 1.)) for w, _ in stats]
    for name, kw in (('exact param_stats', dict(param_stats=stats)), ('sampled params', {}),
                     ('bias means 5', dict(param_stats=shifted))):
      kf = jax.jit(iw.kernelize(mlp, params, **kw), static_argnums=2)
      times[name] = best_time(lambda a: kf(a, a, ('nngp', 'ntk')), x, reps=args.reps)
    ratio = times['sampled params'] / times['exact param_stats']
    print(f'N={n}: ' + ', '.join(f'{k} {1e3 * t:.2f} ms' for k, t in times.items())
          + f'; sampled/exact {ratio:.2f}x')


if __name__ == '__main__':
  main()
