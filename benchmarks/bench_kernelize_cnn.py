"""kernelize vs Neural Tangents: the NT README's 21-layer `Conv(3x3, SAME) + ReLU` CNN.

Two readouts, as in NT's benchmark: Flatten (32x32x3 inputs, N=64; only pixel
diagonals are needed, so kernelize tracks (N, N, H, W) blocks) and
GlobalAvgPool (8x8x3 inputs, N=16; full (N, N, H, H', W, W') blocks). Prints
the time per NTK entry of the jitted `kernel_fn(x, x, ('nngp', 'ntk'))` for
infwidth and, in a subprocess of the reference environment built by
`../shared/tools/nt-reference-env`, for NT 0.6.5, their ratio, agreement, and
kernelize's trace-and-compile time against depth, the growth of resident memory
while one call runs, for both, and for the pooled case the achieved fraction of the
machine's float32 peak (measured by a matrix product in the same process).

Run: python benchmarks/bench_kernelize_cnn.py [--nt-python /tmp/nt-ref/bin/python] [--quick]
       [--readouts flatten,gap] [--depth 21] [--reps 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

from timing import best_time, reference_env, time_kernel_fn

W_STD, B_STD, WIDTH = 1.4, 0.1, 64
CASES = {'flatten': (32, 64), 'gap': (8, 16)}  # image size, N

# Run in a fresh process for each library, so that the resident-memory growth
# of the first call is comparable.
MEASURE = textwrap.dedent('''
    import json, time
    import jax
    import numpy as np

    def measure(kernel_fn, x, reps, out_path):
      compiled = kernel_fn.lower(x, x, ('nngp', 'ntk')).compile()

      def status(key):
        with open('/proc/self/status') as f:
          return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets the peak resident size (VmHWM) to the current one
      before = status('VmRSS:')
      k = jax.block_until_ready(compiled(x, x))
      mem = status('VmHWM:') - before
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        k = jax.block_until_ready(compiled(x, x))
        times.append(time.perf_counter() - t)
      np.save(out_path, np.stack([np.asarray(k.nngp), np.asarray(k.ntk)]))
      print(json.dumps(dict(best=min(times), mem=mem)))
''')

NT_SCRIPT = textwrap.dedent('''
    import sys
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
    x = jnp.asarray(np.load(sys.argv[4]))
    measure(jax.jit(kernel_fn, static_argnames='get'), x, reps, sys.argv[5])
''') % dict(width=WIDTH, w=W_STD, b=B_STD)

INFWIDTH_SCRIPT = textwrap.dedent('''
    import sys
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, %(here)r)
    from bench_kernelize_cnn import infwidth_kernel_fn
    readout, depth, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    x = jnp.asarray(np.load(sys.argv[4]))
    measure(infwidth_kernel_fn(readout, depth, x.shape[-1]), x, reps, sys.argv[5])
    # The float64 kernel, to tell which float32 result is closer to it.
    jax.config.update('jax_enable_x64', True)
    x64 = jnp.asarray(x, jnp.float64)
    k = infwidth_kernel_fn(readout, depth, x.shape[-1], 'float64')(x64, x64, ('nngp', 'ntk'))
    np.save(sys.argv[5] + '.f64.npy', np.stack([np.asarray(k.nngp), np.asarray(k.ntk)]))
''') % dict(here=os.path.dirname(os.path.abspath(__file__)))


def run_measure(python, body, env, readout, depth, reps, x):
  """(best seconds, peak memory growth in bytes, kernels) from a fresh process."""
  with tempfile.TemporaryDirectory() as tmp:
    np.save(f'{tmp}/x.npy', x)
    with open(f'{tmp}/run.py', 'w') as f:
      f.write(MEASURE + body)
    out = subprocess.run([python, f'{tmp}/run.py', readout, str(depth), str(reps),
                          f'{tmp}/x.npy', f'{tmp}/k.npy'],
                         capture_output=True, text=True, cwd=tmp, env=env)
    if out.returncode:
      raise RuntimeError(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    k = np.load(f'{tmp}/k.npy')
    if os.path.exists(f'{tmp}/k.npy.f64.npy'):
      k = (k, np.load(f'{tmp}/k.npy.f64.npy'))
    return res['best'], res['mem'], k


def infwidth_kernel_fn(readout, depth, channels, dtype='float32'):
  import jax
  import jax.numpy as jnp
  from jax import lax
  import infwidth as iw

  def net(params, x):
    # NT parameterisation: entries N(0, 1), scaled by W_std/sqrt(fan_in).
    for w, b in params['convs']:
      fan_in = 9 * x.shape[-1]
      x = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = jax.nn.relu(float(W_STD / np.sqrt(fan_in)) * x + B_STD * b)
    x = x.reshape(x.shape[0], -1) if readout == 'flatten' else x.mean((1, 2))
    w, b = params['dense']
    return float(W_STD / np.sqrt(x.shape[-1])) * (x @ w) + B_STD * b

  f32 = jnp.dtype(dtype)
  convs = [(jax.ShapeDtypeStruct((3, 3, channels if i == 0 else WIDTH, WIDTH), f32),
            jax.ShapeDtypeStruct((WIDTH,), f32)) for i in range(depth)]
  size = CASES[readout][0]
  fan = size * size * WIDTH if readout == 'flatten' else WIDTH
  params = dict(convs=convs, dense=(jax.ShapeDtypeStruct((fan, 10), f32),
                                    jax.ShapeDtypeStruct((10,), f32)))
  stats = jax.tree_util.tree_map(lambda _: iw.ParamStats(0., 1.), params)
  return jax.jit(iw.kernelize(net, params, param_stats=stats), static_argnames='get')


def compile_time(readout, x, depth):
  """kernelize's trace-and-compile time of the jitted kernel function."""
  return time_kernel_fn(infwidth_kernel_fn(readout, depth, x.shape[-1]), x, 1)[0]


def kernel_flops(readout, x, depth):
  """Floating-point operations that `kernel_fn(x, x)` executes.

  XLA's count of the unoptimised program with no loops, so every layer is
  counted: for one block of input pairs, times the blocks computed (those on
  and above the diagonal), or for the whole program if it is not blocked.
  """
  from infwidth.domain import pair_blocks
  from infwidth.interpreters import loop_rolling
  seen = []
  blocked_kernel = pair_blocks.blocked_kernel

  def spy(pair_fn, x1, x2, rows):
    seen.append(rows)
    return blocked_kernel(pair_fn, x1, x2, rows)

  def count(*args):
    cost = infwidth_kernel_fn(readout, depth, x.shape[-1]).lower(*args, ('nngp', 'ntk')).cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']

  saved = loop_rolling.MIN_REPEATS
  loop_rolling.MIN_REPEATS = 10 ** 9
  pair_blocks.blocked_kernel = spy
  try:
    whole = count(x, x)
    if not seen:
      return whole
    rows = seen[0]
    n_blocks = -(-x.shape[0] // rows)
    return n_blocks * (n_blocks + 1) // 2 * count(x[:rows], x[rows:2 * rows])
  finally:
    loop_rolling.MIN_REPEATS = saved
    pair_blocks.blocked_kernel = blocked_kernel


def matmul_peak(reps=5, n=2048):
  """FLOP/s of a large float32 matrix product: the machine's practical peak."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  return 2 * n ** 3 / best_time(jax.jit(lambda a: a @ a), a, reps=reps)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--nt-python', default='/tmp/nt-ref/bin/python')
  parser.add_argument('--depth', type=int, default=21)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--quick', action='store_true', help='smaller N for a fast check')
  parser.add_argument('--readouts', default='flatten,gap', help='which cases to run')
  args = parser.parse_args()
  import jax.numpy as jnp
  peak = matmul_peak()
  print(f'machine: float32 matmul peak {peak / 1e9:.0f} GFLOP/s (2048x2048, jitted)')
  for readout in args.readouts.split(','):
    size, n = CASES[readout]
    if args.quick:
      n = max(4, n // 4)
    x = np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)
    best, mem, (k, k64) = run_measure(sys.executable, INFWIDTH_SCRIPT, dict(os.environ),
                                      readout, args.depth, args.reps, x)
    print(f'[{readout}] N={n}, {size}x{size}x3, depth {args.depth}: infwidth {best:.3f} s '
          f'({best / (n * n) * 1e3:.3f} ms per entry), peak memory growth {mem / 2**20:.0f} MiB')
    if readout == 'gap':
      flops = kernel_flops(readout, jnp.asarray(x), args.depth)
      print(f'  {flops / 1e9:.2f} GFLOP: {flops / best / 1e9:.1f} GFLOP/s, '
            f'{flops / best / peak:.1%} of the matmul peak')
    for depth in sorted({max(1, args.depth // 3), max(1, 2 * args.depth // 3), args.depth}):
      print(f'  trace+compile at depth {depth}: '
            f'{compile_time(readout, jnp.asarray(x[:4]), depth):.1f} s')
    if not os.path.exists(args.nt_python):
      print('  NT reference environment not found; build it with ../shared/tools/nt-reference-env')
      continue
    nt_best, nt_mem, nt_k = run_measure(args.nt_python, NT_SCRIPT, reference_env(), readout,
                                        args.depth, args.reps, x)
    print(f'  NT 0.6.5: {nt_best:.3f} s ({nt_best / (n * n) * 1e3:.3f} ms per entry), '
          f'peak memory growth {nt_mem / 2**20:.0f} MiB; speed-up {nt_best / best:.2f}x, '
          f'memory ratio {mem / max(nt_mem, 1):.2f}')
    rel = lambda a, b: np.abs(a - b).max() / np.abs(b).max()
    for i, name in enumerate(('NNGP', 'NTK')):
      print(f'  {name} max relative difference (float32): infwidth vs NT {rel(k[i], nt_k[i]):.1e}; '
            f'vs infwidth float64: infwidth {rel(k[i], k64[i]):.1e}, NT {rel(nt_k[i], k64[i]):.1e}')


if __name__ == '__main__':
  sys.exit(main())
