"""Empirical NTK implementations: time and memory, as ratios to Jacobian
contraction.

  python benchmarks/bench_empirical.py [--quick] [--mem-limit-gb 4]

For an MLP and a ResNet-ish CNN (32×32×3 inputs), N inputs (`x2=None`), 10
outputs, `vmap_axes=0`, float32, with `trace_axes=(-1,)` and `()`, each
implementation is compiled once and timed (best of up to 3 runs). Memory is
XLA's buffer assignment of the compiled program (arguments + outputs +
temporaries): the peak the program needs, measured without running it, so
configurations over `--mem-limit-gb` are reported and skipped.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import infwidth as iw
from infwidth.empirical import ntk as ntk_module

IMPLS = list(iw.NtkImplementation)
SHORT = {0: 'AUTO', 1: 'JAC', 2: 'NTKVP', 3: 'STRUCT'}


def mlp(width, depth, d_in=64, classes=10):
  keys = jax.random.split(jax.random.PRNGKey(0), depth + 1)
  dims = [d_in] + [width] * depth + [classes]
  params = [(jax.random.normal(k, (a, b), jnp.float32), jnp.zeros((b,)))
            for k, a, b in zip(keys, dims[:-1], dims[1:])]

  def f(p, x):
    for w, b in p[:-1]:
      x = jax.nn.relu(x @ w / w.shape[0] ** .5 + b)
    w, b = p[-1]
    return x @ w / w.shape[0] ** .5 + b
  return f, params, (d_in,)


def resnet(channels=16, blocks=2, classes=10):
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 4 + 2 * blocks))
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=dn) / np.sqrt(
          w.shape[0] * w.shape[1] * w.shape[2])
  params = dict(
      stem=jax.random.normal(next(keys), (3, 3, 3, channels)),
      blocks=[(jax.random.normal(next(keys), (3, 3, channels, channels)),
               jax.random.normal(next(keys), (3, 3, channels, channels)))
              for _ in range(blocks)],
      head=jax.random.normal(next(keys), (channels, classes)))

  def f(p, x):
    h = conv(x, p['stem'])
    for w1, w2 in p['blocks']:
      h = h + conv(jax.nn.relu(conv(jax.nn.relu(h), w1)), w2)
      h = lax.reduce_window(h, 0., lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                            'VALID') / 4.
    h = h.mean((1, 2))
    return h @ p['head'] / np.sqrt(h.shape[-1])
  return f, params, (32, 32, 3)


def measure(f, params, x, trace_axes, impl, mem_limit):
  fn = jax.jit(iw.empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=0,
                                   implementation=impl))
  t0 = time.perf_counter()
  compiled = fn.lower(x, None, params).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  mem = (m.temp_size_in_bytes + m.argument_size_in_bytes +
         m.output_size_in_bytes)
  if mem > mem_limit:
    return dict(mem=mem, time=None, compile=compile_s)
  times, total = [], 0.
  while len(times) < 3 and total < 10.:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x, None, params))
    times.append(time.perf_counter() - t0)
    total += times[-1]
  return dict(mem=mem, time=min(times), compile=compile_s)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--quick', action='store_true', help='smaller sizes')
  ap.add_argument('--mlp-width', type=int, default=512)
  ap.add_argument('--mem-limit-gb', type=float, default=4.)
  args = ap.parse_args()
  sizes = (4, 8) if args.quick else (16, 64)
  models = dict(mlp=mlp(args.mlp_width, 4), resnet=resnet())
  limit = args.mem_limit_gb * 2 ** 30
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; float32; '
        f'vmap_axes=0; x2=None; MLP width {args.mlp_width}, depth 4')
  print(f'{"model":7s} {"N":>3s} {"trace":>6s} | ' + ' | '.join(
      f'{SHORT[i]:>6s} t/JAC  mem/JAC' for i in IMPLS) +
        ' | JAC time   JAC mem | AUTO picks')
  for name, (f, params, shape) in models.items():
    for n in sizes:
      x = jax.random.normal(jax.random.PRNGKey(n), (n,) + shape, jnp.float32)
      for trace_axes in ((-1,), ()):
        res = {i: measure(f, params, x, trace_axes, i, limit) for i in IMPLS}
        pick = ntk_module._choose_implementation(
            f, x, None, params, {}, trace_axes, (), 0, None)
        jac = res[iw.NtkImplementation.JACOBIAN_CONTRACTION]
        cells = []
        for i in IMPLS:
          r = res[i]
          t = ('  skip' if r['time'] is None or jac['time'] is None
               else f'{r["time"] / jac["time"]:6.3f}')
          cells.append(f'{"":>6s} {t} {r["mem"] / jac["mem"]:8.3f}')
        jt = 'skipped' if jac['time'] is None else f'{jac["time"]:8.3f}s'
        print(f'{name:7s} {n:3d} {str(trace_axes):>6s} | ' + ' | '.join(
            c[7:] for c in cells) +
              f' | {jt} {jac["mem"] / 2**20:8.1f}MB | {SHORT[int(pick)]}',
              flush=True)
        for i in IMPLS:
          r = res[i]
          t = 'skipped (memory)' if r['time'] is None else f'{r["time"]:.4f}s'
          print(f'    {SHORT[i]:6s} time {t:>18s}  mem {r["mem"] / 2**20:9.1f}MB'
                f'  compile {r["compile"]:.1f}s', flush=True)


if __name__ == '__main__':
  main()
