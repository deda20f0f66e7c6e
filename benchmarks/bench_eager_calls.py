"""Eager `kernel_fn` calls against the jitted form, each in a fresh process.

For the Flax MNIST CNN (the Flax example's architecture: two 3×3
convolutions with average pooling, two dense layers; 28×28×1 inputs, N=8) and
an MLP, times `kernel_fn(x, None, ('nngp', 'ntk'))`:

  eager first   the first eager call (tracing, compiling, running);
  eager again   a second eager call with the same shapes (the compiled
                computation reused);
  jit first     the first call of `jax.jit(kernel_fn, static_argnames='get')`
                in another fresh process;
  jit again     its second call.

An eager call is meant to cost no more than the first call of the jitted form,
and a repeated one no more than a jitted call.

Run: python benchmarks/bench_eager_calls.py
"""

import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import json, sys, time
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    import infwidth as iw

    name, mode = sys.argv[1], sys.argv[2]

    class CNN(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)

    class MLP(nn.Module):
      @nn.compact
      def __call__(self, x):
        for _ in range(3):
          x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)

    model, shape = {'flax-mnist-cnn': (CNN(), (8, 28, 28, 1)),
                    'flax-mlp': (MLP(), (64, 784))}[name]
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    params = model.init(jax.random.PRNGKey(1), x)['params']
    stats = jax.tree_util.tree_map_with_path(
        lambda p, l: iw.ParamStats(0., 1. / np.prod(l.shape[:-1]))
        if 'kernel' in jax.tree_util.keystr(p) else iw.ParamStats(0., 0.), params)
    kf = iw.kernelize(lambda p, x: model.apply({'params': p}, x), params, param_stats=stats)
    if mode == 'jit':
      kf = jax.jit(kf, static_argnames='get')
    times = []
    for _ in range(2):
      t = time.perf_counter()
      jax.block_until_ready(kf(x, None, ('nngp', 'ntk')))
      times.append(time.perf_counter() - t)
    print(json.dumps(times))
''')


def _child(name, mode):
  out = subprocess.run([sys.executable, '-c', CHILD, name, mode], capture_output=True,
                       text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  print(f'{"network":16s} {"eager first":>12s} {"eager again":>12s} {"jit first":>10s} '
        f'{"jit again":>10s}  eager first / jit first', flush=True)
  for name in ('flax-mnist-cnn', 'flax-mlp'):
    eager, jit = _child(name, 'eager'), _child(name, 'jit')
    print(f'{name:16s} {eager[0]:11.2f}s {eager[1]:11.3f}s {jit[0]:9.2f}s {jit[1]:9.3f}s  '
          f'{eager[0] / jit[0]:.2f}', flush=True)


if __name__ == '__main__':
  main()
