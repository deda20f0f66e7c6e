"""kernelize's memory estimate (`infwidth.interpreters.memory`) against measured peaks.

For each network, a fresh subprocess computes `kernel_fn(x, None, ('nngp',
'ntk'))` on N inputs (float32), eagerly and under `jax.jit`, and reports:

  estimate  what kernelize estimates before computing (and checks against the
            available memory);
  eager     the process's peak resident memory (VmHWM) during the call, less
            its resident memory before it (inputs, compiled code of a warm-up
            call on the same shapes included in the baseline);
  jit       XLA's buffer assignment of the jitted kernel function
            (`compiled.memory_analysis()`: arguments + outputs + temporaries).

and the ratio estimate / measured. The estimate is meant to be within 2x
above the eager peak (op-by-op evaluation holds more at once than XLA's
fused program).

Run: python benchmarks/bench_memory_estimate.py [--scale 1.0]
"""

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import infwidth as iw
    from infwidth.interpreters import memory

    name, n, eager_too = sys.argv[1], int(sys.argv[2]), sys.argv[3] == '1'
    key = jax.random.PRNGKey(0)

    def dense(widths, bias, act):
      ks = jax.random.split(key, 2 * len(widths))
      params = [(jax.random.normal(ks[2 * i], (a, b)) / np.sqrt(a),
                 (0.1 * jax.random.normal(ks[2 * i + 1], (b,)) if bias else jnp.zeros((b,))))
                for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
      def f(p, x):
        for w, b in p[:-1]:
          x = act(x @ w + b)
        w, b = p[-1]
        return x @ w + b
      return f, params, (widths[0],)

    def cnn(depth, pool):
      dn = ('NHWC', 'HWIO', 'NHWC')
      ks = jax.random.split(key, depth + 1)
      chans = [3] + [64] * depth
      params = {'convs': [jax.random.normal(ks[i], (3, 3, chans[i], chans[i + 1]))
                          / np.sqrt(9 * chans[i]) for i in range(depth)],
                'out': jax.random.normal(ks[-1], (64 * (1 if pool else 64), 10)) / 8}
      def f(p, x):
        for w in p['convs']:
          x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                                       dimension_numbers=dn))
        x = x.mean((1, 2)) if pool else x.reshape(x.shape[0], -1)
        return x @ p['out']
      return f, params, (8, 8, 3)

    nets = {
        'mlp-relu': lambda: dense((784, 512, 512, 512, 10), False, jax.nn.relu),
        'mlp-relu-bias': lambda: dense((784, 512, 512, 10), True, jax.nn.relu),
        'mlp-erf': lambda: dense((784, 512, 512, 10), False, jax.scipy.special.erf),
        'cnn-flatten': lambda: cnn(3, False),
        'cnn-pool': lambda: cnn(2, True),
    }
    f, params, feat = nets[name]()
    recorded = []
    memory.check_fits = lambda peak, out, n1, n2: recorded.append((peak, out))
    kf = iw.kernelize(f, params)
    x = jax.random.normal(key, (n,) + feat)
    get = ('nngp', 'ntk')

    def rss(field):
      with open('/proc/self/status') as fh:
        for line in fh:
          if line.startswith(field):
            return int(line.split()[1]) * 1024

    if eager_too:
      jax.block_until_ready(kf(x, None, get))   # warm-up: compiled code in the baseline
      estimate = recorded[-1][0]
      import ctypes
      ctypes.CDLL('libc.so.6').malloc_trim(0)
      base = rss('VmRSS:')
      with open('/proc/self/clear_refs', 'w') as fh:   # resets VmHWM to the current RSS
        fh.write('5')
      jax.block_until_ready(kf(x, None, get))
      eager = rss('VmHWM:') - base
    else:
      estimate = eager = 0
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    mem = jax.jit(kf, static_argnames='get').lower(spec, None, get).compile().memory_analysis()
    jit = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    print(json.dumps(dict(estimate=estimate, estimate_jit=recorded[-1][0], eager=eager,
                          jit=jit)))
''')

# (network, N measured eagerly or None, N compiled under jit). Sampled biases
# have a nonzero mean: relu then goes to quadrature (~60 µs per kernel entry),
# hence the smaller N. Compiling needs no run, so the jit column goes larger.
# The CNNs are computed on blocks of pairs, whose memory is small next to the
# process's own at any N that runs here in minutes: jit column only.
CASES = [('mlp-relu', 4096, 8192), ('mlp-erf', 4096, 8192), ('mlp-relu-bias', 512, 2048),
         ('cnn-flatten', None, 4096), ('cnn-pool', None, 4096)]


def _child(name, n, eager):
  out = subprocess.run([sys.executable, '-c', CHILD, name, str(n), '1' if eager else '0'],
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--scale', type=float, default=1.0, help='multiplies every N')
  parser.add_argument('--only', default=None, help='one network')
  args = parser.parse_args()
  mib = lambda b: f'{b / 2 ** 20:8.0f} MiB'
  print(f'{"network":14s} {"mode":5s} {"N":>6s} {"estimate":>12s} {"measured":>12s} '
        f'{"ratio":>6s}', flush=True)
  for name, n_eager, n_jit in CASES:
    if args.only and name != args.only:
      continue
    if n_eager:
      n = int(n_eager * args.scale)
      r = _child(name, n, True)
      print(f'{name:14s} eager {n:6d} {mib(r["estimate"])} {mib(r["eager"])} '
            f'{r["estimate"] / r["eager"]:6.2f}', flush=True)
    n = int(n_jit * args.scale)
    r = _child(name, n, False)
    print(f'{name:14s} jit   {n:6d} {mib(r["estimate_jit"])} {mib(r["jit"])} '
          f'{r["estimate_jit"] / r["jit"]:6.2f}', flush=True)


if __name__ == '__main__':
  main()
