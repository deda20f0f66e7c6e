"""kernelize vs Neural Tangents: the NT README's 21-layer `Conv(3x3, SAME) + ReLU` CNN.

Two readouts, as in NT's benchmark: Flatten (32x32x3 inputs, N=64; only pixel
diagonals are needed, so kernelize tracks (N, N, H, W) blocks) and
GlobalAvgPool (8x8x3 inputs, N=16; full (N, N, H, H', W, W') blocks). Prints
the time per NTK entry of the jitted `kernel_fn(x, x, ('nngp', 'ntk'))` for
infwidth and, in a subprocess of the reference environment built by
`../shared/tools/nt-reference-env`, for NT 0.6.5, their ratio, agreement, and
kernelize's trace-and-compile time against depth.

Run: python benchmarks/bench_kernelize_cnn.py [--nt-python /tmp/nt-ref/bin/python] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

from timing import reference_env, time_kernel_fn

W_STD, B_STD, WIDTH = 1.4, 0.1, 64
CASES = {'flatten': (32, 64), 'gap': (8, 16)}  # image size, N

NT_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import jax, jax.numpy as jnp  # before numpy: the reference env's ml_dtypes needs it
    import numpy as np
    from neural_tangents import stax
    readout, depth, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    layers = []
    for _ in range(depth):
      layers += [stax.Conv(%(width)d, (3, 3), padding='SAME', W_std=%(w)r, b_std=%(b)r), stax.Relu()]
    layers += [stax.Flatten() if readout == 'flatten' else stax.GlobalAvgPool(),
               stax.Dense(10, W_std=%(w)r, b_std=%(b)r)]
    _, _, kernel_fn = stax.serial(*layers)
    kernel_fn = jax.jit(kernel_fn, static_argnames='get')
    x = jnp.asarray(np.load(sys.argv[4]))
    k = kernel_fn(x, x, ('nngp', 'ntk')); jax.block_until_ready(k)
    times = []
    for _ in range(reps):
      t = time.perf_counter(); k = kernel_fn(x, x, ('nngp', 'ntk')); jax.block_until_ready(k)
      times.append(time.perf_counter() - t)
    np.save(sys.argv[5], np.stack([np.asarray(k.nngp), np.asarray(k.ntk)]))
    print(json.dumps(dict(best=min(times))))
''') % dict(width=WIDTH, w=W_STD, b=B_STD)


def infwidth_kernel_fn(readout, depth, channels):
  import jax
  import jax.numpy as jnp
  from jax import lax
  import infwidth as iw

  def net(params, x):
    # NT parameterisation: entries N(0, 1), scaled by W_std/sqrt(fan_in).
    for w, b in params['convs']:
      fan_in = 9 * x.shape[-1]
      x = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = jax.nn.relu(W_STD / np.sqrt(fan_in) * x + B_STD * b)
    x = x.reshape(x.shape[0], -1) if readout == 'flatten' else x.mean((1, 2))
    w, b = params['dense']
    return W_STD / np.sqrt(x.shape[-1]) * (x @ w) + B_STD * b

  f32 = jnp.float32
  convs = [(jax.ShapeDtypeStruct((3, 3, channels if i == 0 else WIDTH, WIDTH), f32),
            jax.ShapeDtypeStruct((WIDTH,), f32)) for i in range(depth)]
  size = CASES[readout][0]
  fan = size * size * WIDTH if readout == 'flatten' else WIDTH
  params = dict(convs=convs, dense=(jax.ShapeDtypeStruct((fan, 10), f32),
                                    jax.ShapeDtypeStruct((10,), f32)))
  stats = jax.tree_util.tree_map(lambda _: iw.ParamStats(0., 1.), params)
  return jax.jit(iw.kernelize(net, params, param_stats=stats), static_argnames='get')


def time_infwidth(readout, x, depth, reps):
  kernel_fn = infwidth_kernel_fn(readout, depth, x.shape[-1])
  compile_time, best, _, k = time_kernel_fn(kernel_fn, x, reps)
  return compile_time, best, np.stack([np.asarray(k.nngp), np.asarray(k.ntk)])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--nt-python', default='/tmp/nt-ref/bin/python')
  parser.add_argument('--depth', type=int, default=21)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='smaller N for a fast check')
  args = parser.parse_args()
  import jax.numpy as jnp
  for readout, (size, n) in CASES.items():
    if args.quick:
      n = max(4, n // 4)
    x = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
    compile_time, best, k = time_infwidth(readout, jnp.asarray(x), args.depth, args.reps)
    per_entry = best / (n * n) * 1e3
    print(f'[{readout}] N={n}, {size}x{size}x3, depth {args.depth}: infwidth {best:.3f} s '
          f'({per_entry:.3f} ms per entry), trace+compile {compile_time:.1f} s')
    for depth in sorted({max(1, args.depth // 3), max(1, 2 * args.depth // 3)}):
      ct, _, _ = time_infwidth(readout, jnp.asarray(x[:4]), depth, 1)
      print(f'  trace+compile at depth {depth}: {ct:.1f} s')
    if not os.path.exists(args.nt_python):
      print('  NT reference environment not found; build it with ../shared/tools/nt-reference-env')
      continue
    with tempfile.TemporaryDirectory() as tmp:
      np.save(f'{tmp}/x.npy', x)
      with open(f'{tmp}/nt.py', 'w') as f:
        f.write(NT_SCRIPT)
      out = subprocess.run([args.nt_python, f'{tmp}/nt.py', readout, str(args.depth),
                            str(args.reps), f'{tmp}/x.npy', f'{tmp}/k.npy'],
                           capture_output=True, text=True, cwd=tmp, env=reference_env())
      if out.returncode:
        print(out.stderr[-2000:])
        continue
      nt_best = json.loads(out.stdout.strip().splitlines()[-1])['best']
      nt_k = np.load(f'{tmp}/k.npy')
    print(f'  NT 0.6.5: {nt_best:.3f} s ({nt_best / (n * n) * 1e3:.3f} ms per entry); '
          f'speed-up {nt_best / best:.2f}x')
    for i, name in enumerate(('NNGP', 'NTK')):
      rel = np.abs(k[i] - nt_k[i]).max() / np.abs(nt_k[i]).max()
      print(f'  {name} max relative difference from NT (float32): {rel:.1e}')


if __name__ == '__main__':
  sys.exit(main())
