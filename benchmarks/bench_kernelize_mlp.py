"""kernelize vs Neural Tangents: NNGP+NTK of a 3-hidden-layer ReLU MLP.

Times the jitted `kernel_fn(x, x, ('nngp', 'ntk'))` on 2048×784 inputs (float32)
for infwidth and, in a subprocess of the reference environment built by
`../shared/tools/nt-reference-env`, for NT 0.6.5's `stax`; prints both and
their ratio, plus infwidth's trace-and-compile time and its agreement with NT.

Run: python benchmarks/bench_kernelize_mlp.py [--nt-python /tmp/nt-ref/bin/python] [--n 2048]
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from timing import reference_env, time_kernel_fn

WIDTHS = (512, 512, 512)
W_STD, B_STD = 1.5, 0.05
REPEATS = 15

NT_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import jax, jax.numpy as jnp  # before numpy: the reference env's ml_dtypes needs it
    import numpy as np
    from neural_tangents import stax
    n, d, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    layers = []
    for w in %(widths)r:
      layers += [stax.Dense(w, W_std=%(w_std)r, b_std=%(b_std)r), stax.Relu()]
    _, _, kernel_fn = stax.serial(*layers, stax.Dense(10, W_std=%(w_std)r, b_std=%(b_std)r))
    kernel_fn = jax.jit(kernel_fn, static_argnames='get')
    x = jnp.asarray(np.load(sys.argv[4]))
    t = time.perf_counter(); k = kernel_fn(x, x, ('nngp', 'ntk')); jax.block_until_ready(k)
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
      t = time.perf_counter(); k = kernel_fn(x, x, ('nngp', 'ntk')); jax.block_until_ready(k)
      times.append(time.perf_counter() - t)
    np.save(sys.argv[5], np.stack([np.asarray(k.nngp[:64, :64]), np.asarray(k.ntk[:64, :64])]))
    print(json.dumps(dict(first=first, best=min(times), median=float(np.median(times)))))
''') % dict(widths=WIDTHS, w_std=W_STD, b_std=B_STD)


def mlp(params, x):
  """NT parameterisation: W, b ~ N(0, 1), scaled by W_std/sqrt(fan_in) and b_std."""
  import jax
  for w, b in params[:-1]:
    x = jax.nn.relu(W_STD / np.sqrt(w.shape[0]) * (x @ w) + B_STD * b)
  w, b = params[-1]
  return W_STD / np.sqrt(w.shape[0]) * (x @ w) + B_STD * b


def time_infwidth(x):
  import jax
  import jax.numpy as jnp
  import infwidth as iw

  dims = (x.shape[1],) + WIDTHS + (10,)
  params, stats = [], []
  for fan_in, fan_out in zip(dims[:-1], dims[1:]):
    params.append((jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
                   jax.ShapeDtypeStruct((fan_out,), jnp.float32)))
    stats.append((iw.ParamStats(0., 1.), iw.ParamStats(0., 1.)))
  kernel_fn = jax.jit(iw.kernelize(mlp, params, param_stats=stats), static_argnames='get')
  compile_time, best, times, k = time_kernel_fn(kernel_fn, jnp.asarray(x), REPEATS)
  # The same kernel as kernel_fn(x), x2=None (the form predict's users write).
  self_kernel_fn = jax.jit(lambda a, b, get: kernel_fn(a, None, get), static_argnames='get')
  best_self = time_kernel_fn(self_kernel_fn, jnp.asarray(x), REPEATS)[1]
  return compile_time, best, float(np.median(times)), best_self, np.stack(
      [np.asarray(k.nngp[:64, :64]), np.asarray(k.ntk[:64, :64])])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--nt-python', default='/tmp/nt-ref/bin/python')
  parser.add_argument('--n', type=int, default=2048)
  parser.add_argument('--d', type=int, default=784)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.n, args.d)).astype(np.float32)
  compile_time, best, median, best_self, kernels = time_infwidth(x)
  print(f'infwidth: trace+compile {compile_time:.2f} s; kernel {best:.3f} s (best of {REPEATS}), '
        f'median {median:.3f} s; kernel_fn(x) with x2=None {best_self:.3f} s')
  if not os.path.exists(args.nt_python):
    print(f'NT reference environment not found at {args.nt_python}; build it with '
          '../shared/tools/nt-reference-env')
    return
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    np.save(f'{tmp}/x.npy', x)
    script = f'{tmp}/nt.py'
    with open(script, 'w') as f:
      f.write(NT_SCRIPT)
    out = subprocess.run([args.nt_python, script, str(args.n), str(args.d), str(REPEATS),
                          f'{tmp}/x.npy', f'{tmp}/k.npy'], capture_output=True, text=True,
                         cwd=tmp, env=reference_env())
    if out.returncode:
      print(out.stderr[-2000:])
      return
    nt = json.loads(out.stdout.strip().splitlines()[-1])
    nt_k = np.load(f'{tmp}/k.npy')
  print(f'NT 0.6.5: first call {nt["first"]:.2f} s; kernel {nt["best"]:.3f} s (best of {REPEATS}), '
        f'median {nt["median"]:.3f} s')
  print(f'speed-up (NT time / infwidth time, best): {nt["best"] / best:.2f}x')
  k64 = float64_block(x[:64])
  rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
  for i, name in enumerate(('NNGP', 'NTK')):
    print(f'{name} (float32, 64x64 block) max relative difference: infwidth vs NT '
          f'{rel(kernels[i], nt_k[i]):.1e}; vs infwidth float64: infwidth '
          f'{rel(kernels[i], k64[i]):.1e}, NT {rel(nt_k[i], k64[i]):.1e}')


def float64_block(x):
  """The float64 kernel of the first rows (the reference for both float32 results)."""
  import jax
  import jax.numpy as jnp
  import infwidth as iw
  jax.config.update('jax_enable_x64', True)
  dims = (x.shape[1],) + WIDTHS + (10,)
  params = [(jax.ShapeDtypeStruct((a, b), jnp.float64), jax.ShapeDtypeStruct((b,), jnp.float64))
            for a, b in zip(dims[:-1], dims[1:])]
  stats = [(iw.ParamStats(0., 1.), iw.ParamStats(0., 1.)) for _ in params]
  x = jnp.asarray(x, jnp.float64)
  k = iw.kernelize(mlp, params, param_stats=stats)(x, x, ('nngp', 'ntk'))
  return np.stack([np.asarray(k.nngp), np.asarray(k.ntk)])


if __name__ == '__main__':
  sys.exit(main())
