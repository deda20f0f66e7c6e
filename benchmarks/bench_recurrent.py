"""Kernels of recurrent networks: time and memory per kernel entry, against
the cost of a Monte Carlo estimate of the same kernel to 1% error.

An Elman RNN `h_t = tanh(W_h h_{t−1}/√H + W_x x_t/√D + 0.1 b)` and an LSTM
(gates from one split matrix, `c_t = σ(f)c_{t−1} + σ(i)tanh(g)`,
`h_t = σ(o)tanh(c_t)`), readout at the last step, exact parameter moments
N(0, 1), inputs N(0, 1) with D=16 features, float32, jitted
`kernel_fn(x, None, ('nngp', 'ntk'))`, run in separate processes so each
peak memory is its own.

The Monte Carlo cost is that of finite networks of width H (one jitted
forward pass of N inputs per draw; the NNGP estimate `f fᵀ / C` with C=256
readout channels per draw): the draws needed for a 1% relative standard
error of the kernel's mean entry (`(sd / (0.01·|mean|))²` from the spread of
64 draws), times the time per draw. This is the cost of the NNGP alone; the
NTK by Monte Carlo costs more (Jacobians).

The LSTM's cell state at step t is a function of its 3t gates, integrated
jointly by the quasi-Monte Carlo rule (docs/semantics.md): the cost per entry
grows with the square of the number of Gaussians, and chains of more than 64
Gaussians (t > 21) are refused.

Run: python benchmarks/bench_recurrent.py [--cell elman|lstm] [--t 32 128]
     [--n 128] [--width 512]
     (compile time against the number of steps: --cell elman --t 8 64 --n 8)
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw

D = 16


def shapes(cell, h):
  gates = 4 if cell == 'lstm' else 1
  return {'wx': (D, gates * h), 'wh': (h, gates * h), 'b': (gates * h,), 'o': (h, 256)}


def network(cell, h):
  def elman(p, x):
    def step(s, x_t):
      return jnp.tanh(s @ p['wh'] / np.sqrt(h) + x_t @ p['wx'] / np.sqrt(D) + 0.1 * p['b']), None
    s, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], h), x.dtype), jnp.swapaxes(x, 0, 1))
    return s @ p['o'] / np.sqrt(h)

  def lstm(p, x):
    def step(carry, x_t):
      s, c = carry
      z = x_t @ p['wx'] / np.sqrt(D) + s @ p['wh'] / np.sqrt(h) + 0.1 * p['b']
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      return (jax.nn.sigmoid(o) * jnp.tanh(c), c), None
    zero = jnp.zeros((x.shape[0], h), x.dtype)
    (s, _), _ = jax.lax.scan(step, (zero, zero), jnp.swapaxes(x, 0, 1))
    return s @ p['o'] / np.sqrt(h)

  return {'elman': elman, 'lstm': lstm}[cell]


def one_case(cell, t, n, h):
  """Runs in its own process: analytic times and memory, Monte Carlo cost."""
  x = jax.random.normal(jax.random.PRNGKey(0), (n, t, D))
  shp = shapes(cell, h)
  params = jax.tree.map(lambda s: jnp.zeros(s), shp, is_leaf=lambda s: isinstance(s, tuple))
  stats = jax.tree.map(lambda s: iw.ParamStats(0., 1.), shp, is_leaf=lambda s: isinstance(s, tuple))
  f = network(cell, h)
  kernel_fn = jax.jit(lambda x: iw.kernelize(f, params, param_stats=stats)(x, None, ('nngp', 'ntk')))
  start = time.perf_counter()
  k = jax.block_until_ready(kernel_fn(x))
  first = time.perf_counter() - start
  runs = []
  for _ in range(2):
    start = time.perf_counter()
    k = jax.block_until_ready(kernel_fn(x))
    runs.append(time.perf_counter() - start)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  # Monte Carlo: finite networks of width h, 64 draws for the spread.
  forward = jax.jit(lambda p: (lambda y: y @ y.T / y.shape[-1])(f(p, x)))
  rng = np.random.default_rng(0)
  draw = lambda: jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shp,
                              is_leaf=lambda s: isinstance(s, tuple))
  jax.block_until_ready(forward(draw()))
  draws, spent = [], 0.
  for _ in range(64):
    p = draw()
    start = time.perf_counter()
    draws.append(np.asarray(jax.block_until_ready(forward(p))))
    spent += time.perf_counter() - start
  draws = np.stack(draws)
  mean_entry = np.abs(draws.mean(0)).mean()
  sd_entry = draws.std(0).mean()
  needed = (sd_entry / (0.01 * mean_entry)) ** 2
  per_draw = spent / 64
  nngp = np.asarray(k.nngp)
  return dict(cell=cell, t=t, n=n, width=h, first_call_s=first, call_s=min(runs),
              per_entry_us=min(runs) / n ** 2 * 1e6, peak_gb=peak_gb,
              mc_draws_for_1pct=needed, mc_s_per_draw=per_draw, mc_s_for_1pct=needed * per_draw,
              mc_vs_analytic_rel=float(np.abs(draws.mean(0) - nngp).mean() / np.abs(nngp).mean()))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--cell', nargs='+', default=['elman', 'lstm'])
  parser.add_argument('--t', nargs='+', type=int, default=None)
  parser.add_argument('--n', type=int, default=128)
  parser.add_argument('--width', type=int, default=512)
  parser.add_argument('--one', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    cell, t, n, h = args.one.split(',')
    print(json.dumps({k: (v if isinstance(v, str) else float(v))
                      for k, v in one_case(cell, int(t), int(n), int(h)).items()}))
    return
  print(f'{jax.devices()[0].platform}, float32, jitted kernel_fn(x, None, (nngp, ntk)), '
        f'D={D}, width {args.width} for Monte Carlo')
  for cell in args.cell:
    for t in args.t or ([32, 128] if cell == 'elman' else [4, 8]):
      out = subprocess.run([sys.executable, __file__, '--one', f'{cell},{t},{args.n},{args.width}'],
                           capture_output=True, text=True)
      if out.returncode:
        print(f'{cell} T={t}: failed: {out.stderr.strip().splitlines()[-1]}')
        continue
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{cell:5s} T={t:3d} N={int(r['n'])}: first call {r['first_call_s']:.1f} s, "
            f"call {r['call_s']:.2f} s ({r['per_entry_us']:.1f} µs/entry; trace+compile "
            f"≈ {r['first_call_s'] - r['call_s']:.1f} s), peak {r['peak_gb']:.2f} GB; "
            f"Monte Carlo to 1%: {r['mc_draws_for_1pct']:.0f} draws × {r['mc_s_per_draw']*1e3:.1f} ms "
            f"= {r['mc_s_for_1pct']:.1f} s (NNGP only; its 64-draw mean is within "
            f"{100 * r['mc_vs_analytic_rel']:.1f}% of the analytic NNGP)")


if __name__ == '__main__':
  main()
