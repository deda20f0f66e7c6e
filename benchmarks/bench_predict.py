"""Time and peak memory of `predict.gp_inference`: Cholesky vs CG.

  python benchmarks/bench_predict.py [--sizes 4096 16384] [--matfree-max 4096]

Each configuration runs in its own subprocess, so that its peak resident
memory (`ru_maxrss`) is its own. The kernel is the NNGP of a one-hidden-layer
ReLU network (arc-cosine kernel, Cho & Saul 2009) of Gaussian inputs,
`float64`, with `diag_reg=1e-4`; 1000 test points. Paths:

* `cholesky`: dense kernel (computed in row blocks), Cholesky factorisation.
* `cg`: dense kernel, Jacobi-preconditioned CG (no factorisation).
* `cg-matfree`: `kernel_operator`, CG recomputing kernel rows in blocks of
  1024; the `N x N` kernel is never stored.

Workers run with `OPENBLAS_NUM_THREADS=1`: the multi-threaded `dpotrf` of
the OpenBLAS 0.3.30 that scipy (and through it jaxlib's LAPACK kernels) ships
segfaults at N = 16384 on this machine (also with plain
`numpy.linalg.cholesky`). XLA's own kernels (matmul, elementwise) still use
every core.

Peak memory is that of the whole process (kernel construction included).
The largest `N` in a memory budget is extrapolated from the measured peaks:
`a + b N²` for the dense paths, `a + c N` for the matrix-free one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

D, M, DIAG_REG, TOL, BLOCK = 64, 1000, 1e-4, 1e-8, 1024


def worker(n: int, path: str) -> dict:
  import jax
  jax.config.update('jax_enable_x64', True)
  import jax.numpy as jnp
  import numpy as np
  from infwidth import predict

  @jax.jit
  def nngp(x1, x2):
    k12 = x1 @ x2.T / x1.shape[-1]
    n1 = jnp.sqrt(jnp.sum(x1 ** 2, -1) / x1.shape[-1])[:, None]
    n2 = jnp.sqrt(jnp.sum(x2 ** 2, -1) / x2.shape[-1])[None, :]
    cos = jnp.clip(k12 / (n1 * n2), -1., 1.)
    theta = jnp.arccos(cos)
    return n1 * n2 / (2 * np.pi) * (jnp.sin(theta) +
                                     (np.pi - theta) * cos) + 0.1

  def kernel_fn(x1, x2, get):
    return nngp(x1, x1 if x2 is None else x2)

  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(n, D))
  xt = jnp.asarray(rng.randn(M, D))
  y = jnp.asarray(rng.randn(n, 10))
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  start = time.perf_counter()
  if path == 'cg-matfree':
    k_dd = predict.kernel_operator(kernel_fn, x, None, 'nngp', BLOCK)
    k_td = predict.kernel_operator(kernel_fn, xt, x, 'nngp', BLOCK)
  else:  # Materialised in row blocks: no N x N temporaries beyond K itself.
    k_dd = predict.kernel_operator(kernel_fn, x, None, 'nngp', BLOCK)
    k_dd = k_dd.materialize().block_until_ready()
    k_td = kernel_fn(xt, x, 'nngp').block_until_ready()
  t_kernel = time.perf_counter() - start

  start = time.perf_counter()
  fn = predict.gp_inference(k_dd, y, diag_reg=DIAG_REG,
                            solver=path.split('-')[0], tol=TOL)
  mean = fn('nngp', k_td).block_until_ready()
  t_solve = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return dict(n=n, path=path, kernel_s=t_kernel, solve_s=t_solve,
              peak_bytes=peak, base_bytes=base,
              mean_head=np.asarray(mean[:50]).ravel().tolist())


def run(n: int, path: str) -> dict:
  out = subprocess.run([sys.executable, __file__, '--worker', str(n), path],
                       capture_output=True, text=True, check=True,
                       env=dict(os.environ, OPENBLAS_NUM_THREADS='1',
                                PYTHONPATH=os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__)))))
  return json.loads(out.stdout.strip().splitlines()[-1])


def largest_n(points, budget: float, power: int) -> float:
  """Largest `n` with `a + b n^power <= budget`, fitted to two points."""
  (n1, p1), (n2, p2) = points[0], points[-1]
  b = (p2 - p1) / (n2 ** power - n1 ** power)
  a = p1 - b * n1 ** power
  return ((budget - a) / b) ** (1 / power)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--worker', nargs=2)
  parser.add_argument('--sizes', nargs='+', type=int, default=[4096, 16384])
  parser.add_argument('--matfree-max', type=int, default=4096,
                      help='largest N for the (slow) matrix-free path')
  parser.add_argument('--budget-gib', type=float, default=24.)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(int(args.worker[0]), args.worker[1])))
    return

  import numpy as np
  gib = 2. ** 30
  print(f'gp_inference, arc-cosine NNGP, d={D}, M={M} test points, float64, '
        f'diag_reg={DIAG_REG}, CG tol={TOL}, {os.cpu_count()} CPUs, '
        'OPENBLAS_NUM_THREADS=1')
  print(f'{"N":>6} {"path":>11} {"kernel s":>9} {"solve s":>8} '
        f'{"peak GiB":>9} {"max|Δmean| vs chol":>19}')
  results = {}
  for n in args.sizes:
    for path in ('cholesky', 'cg', 'cg-matfree'):
      if path == 'cg-matfree' and n > args.matfree_max:
        continue
      r = run(n, path)
      results[(n, path)] = r
      ref = results.get((n, 'cholesky'))
      diff = np.max(np.abs(np.array(r['mean_head']) -
                           np.array(ref['mean_head']))) if ref else np.nan
      print(f'{n:>6} {path:>11} {r["kernel_s"]:>9.2f} {r["solve_s"]:>8.2f} '
            f'{r["peak_bytes"] / gib:>9.2f} {diff:>19.2e}', flush=True)

  budget = args.budget_gib * gib
  print(f'\nLargest N in {args.budget_gib:g} GiB (extrapolated from the '
        'measured peaks, not measured):')
  for path, power in (('cholesky', 2), ('cg', 2), ('cg-matfree', 1)):
    pts = [(n, results[(n, path)]['peak_bytes']) for n in args.sizes
           if (n, path) in results]
    if len(pts) >= 2:
      model = 'a + b N^2' if power == 2 else 'a + c N'
      print(f'  {path:>11}: N ≈ {largest_n(pts, budget, power):,.0f} '
            f'(peak = {model})')
    elif path == 'cg-matfree':
      per_row = (BLOCK + 4) * 8  # One block of kernel rows plus CG vectors.
      print(f'  {path:>11}: memory ~ N x {per_row} B: N in the millions; '
            'the limit is time (each CG iteration recomputes the kernel, '
            'O(N² d)).')


if __name__ == '__main__':
  main()
