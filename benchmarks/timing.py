"""Shared helpers of the benchmarks: timing a jitted function or kernel function and
running the Neural Tangents reference interpreter."""

import os
import time

import jax


def best_time(fn, *args, reps: int) -> float:
  """Seconds per call of `fn(*args)`: the best of `reps` calls after a first one."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def time_kernel_fn(kernel_fn, x, reps):
  """(trace+compile seconds, best and all run times, last result) of `kernel_fn(x, x, ('nngp', 'ntk'))`."""
  t = time.perf_counter()
  kernel_fn.lower(x, x, ('nngp', 'ntk')).compile()
  compile_time = time.perf_counter() - t
  k = jax.block_until_ready(kernel_fn(x, x, ('nngp', 'ntk')))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    k = jax.block_until_ready(kernel_fn(x, x, ('nngp', 'ntk')))
    times.append(time.perf_counter() - t)
  return compile_time, min(times), times, k


def reference_env():
  """The environment for the reference interpreter: none of this one's paths."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
  env['JAX_PLATFORMS'] = 'cpu'
  return env
