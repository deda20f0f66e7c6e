"""Time per element of arccos and of the arc-cosine kernels, float32.

Compares `jnp.arccos` with the polynomial `closed_forms.fast_arccos`, and the
four arc-cosine functions of one ReLU layer (J1(±ρ), J0(±ρ)) in three forms:
√(1-ρ²) with `jnp.arccos`, √(1-ρ²) with `fast_arccos`, and the one-root form
infwidth uses for float32. All in one process, on 2048 x 2048 correlations;
prints ratios. Run: python benchmarks/bench_arccos.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain import closed_forms as cf
from timing import best_time

N = 2048
REPEATS = 20


def _relu_layer(arc_cosine):
  # One relu layer's NNGP and NTK factor, J1(ρ) and J0(ρ), reduced to one
  # output (XLA:CPU fuses a loop per output).
  def layer(rho):
    j1, _, j0, _ = arc_cosine(rho)
    return j1 + j0
  return jax.jit(layer)


def main():
  rng = np.random.default_rng(0)
  rho = jnp.asarray(rng.uniform(-1, 1, (N, N)), jnp.float32)
  per = 1e9 / (N * N)
  t_jnp = best_time(jax.jit(jnp.arccos), rho, reps=REPEATS)
  t_fast = best_time(jax.jit(cf.fast_arccos), rho, reps=REPEATS)
  forms = [('sqrt(1-rho^2), jnp.arccos', lambda r: cf.arc_cosine_by_arccos(r, jnp.arccos)),
           ('sqrt(1-rho^2), fast_arccos', lambda r: cf.arc_cosine_by_arccos(r, cf.fast_arccos)),
           ('one root (float32 default)', cf.arc_cosine_one_root)]
  times = [best_time(_relu_layer(f), rho, reps=REPEATS) for _, f in forms]
  print(f'device: {jax.devices()[0].device_kind}, {N}x{N} float32')
  print(f'jnp.arccos         {t_jnp * per:7.2f} ns/element')
  print(f'fast_arccos        {t_fast * per:7.2f} ns/element   ratio jnp/fast {t_jnp / t_fast:5.2f}')
  for (name, _), t in zip(forms, times):
    print(f'relu layer J1 + J0, {name:28s} {t * per:6.2f} ns/element   '
          f'ratio to the first {times[0] / t:5.2f}')


if __name__ == '__main__':
  main()
