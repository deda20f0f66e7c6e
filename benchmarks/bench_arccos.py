"""Time per element of arccos and of the relu NNGP + NTK closed form, float32.

Compares `jnp.arccos` with the polynomial `closed_forms.fast_arccos` and the
relu kernel (`expect_pair` on a 2048 x 2048 covariance) computed with each,
in one process; prints ratios. Run: python benchmarks/bench_arccos.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.rules import closed_forms
from infwidth.rules.gaussian import chain_from_fn, expect_pair

N = 2048
REPEATS = 20


def _time(fn, *args) -> float:
  """Seconds per call, best of REPEATS, after compilation."""
  jax.block_until_ready(fn(*args))
  best = np.inf
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (N, N)), jnp.float32)
  a = rng.standard_normal((N, 64)).astype(np.float32)
  cov = jnp.asarray(a @ a.T / 64)
  var = jnp.diagonal(cov)
  relu = chain_from_fn(jax.nn.relu, dtype=jnp.float32)

  def kernel(v1, v2, c):
    # One relu layer of a kernel computation, NNGP and NTK factor, reduced
    # to one output: XLA:CPU runs fusions with two large outputs several
    # times slower, which would hide the cost of the maths itself.
    t, dt = expect_pair(relu, (), relu, (), 0.0, 0.0, v1[:, None], v2[None, :], c)
    return t + dt

  t_jnp = _time(jax.jit(jnp.arccos), x)
  t_fast = _time(jax.jit(closed_forms.fast_arccos), x)
  t_relu_fast = _time(jax.jit(kernel), var, var, cov)
  saved = closed_forms.arccos
  closed_forms.arccos = jnp.arccos
  jax.clear_caches()     # traced closed forms are cached across jit calls
  try:
    t_relu_jnp = _time(jax.jit(kernel), var, var, cov)
  finally:
    closed_forms.arccos = saved
    jax.clear_caches()
  per = 1e9 / (N * N)
  print(f'device: {jax.devices()[0].device_kind}, {N}x{N} float32')
  print(f'jnp.arccos         {t_jnp * per:7.2f} ns/element')
  print(f'fast_arccos        {t_fast * per:7.2f} ns/element   ratio jnp/fast {t_jnp / t_fast:5.2f}')
  print(f'relu NNGP+NTK (T + Ṫ), jnp.arccos   {t_relu_jnp * per:7.2f} ns/element')
  print(f'relu NNGP+NTK (T + Ṫ), fast_arccos  {t_relu_fast * per:7.2f} ns/element   '
        f'ratio {t_relu_jnp / t_relu_fast:5.2f}')


if __name__ == '__main__':
  main()
