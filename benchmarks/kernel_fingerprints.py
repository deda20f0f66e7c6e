"""Kernel values of the benchmark networks, saved to compare two versions.

Computes the NNGP and NTK (float64 and float32, jitted) of the networks the
benchmarks time — the 3-layer ReLU MLP, the CNNs with Flatten and global
average pooling readouts, the README's WideResNet block at small size — and
of networks that exercise the other rule families (biases and LayerNorm,
quadrature nonlinearities, channel concatenation, strided and pooled
convolutions, a Kernel fed back in), and saves them to an `.npz`. With
`--compare OTHER.npz` it prints, per kernel, the largest difference against
another version's file, relative to the kernel's largest entry.

Uses only the public API, so the same script runs against any version:
    PYTHONPATH=<checkout> python benchmarks/kernel_fingerprints.py --out a.npz
    python benchmarks/kernel_fingerprints.py --out b.npz --compare a.npz
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update('jax_enable_x64', True)

import infwidth as iw  # noqa: E402  (after enabling float64)
from infwidth import stax  # noqa: E402


def _normal(key, shape, std=1.0):
  return std * jax.random.normal(key, shape)


def mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(1.5 / np.sqrt(w.shape[0]) * (x @ w) + 0.05 * b)
  w, b = params[-1]
  return 1.5 / np.sqrt(w.shape[0]) * (x @ w) + 0.05 * b


def mlp_case(key):
  dims = (16, 512, 512, 512, 10)
  keys = jax.random.split(key, 2 * len(dims))
  params = [(_normal(keys[2 * i], (a, b)), _normal(keys[2 * i + 1], (b,)))
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
  stats = [(iw.ParamStats(0., 1.), iw.ParamStats(0., 1.)) for _ in params]
  x = _normal(keys[-1], (12, 16))
  return mlp, params, dict(param_stats=stats), x


def norm_gelu_case(key):
  """LayerNorm statistics, quadrature nonlinearities and a residual sum."""
  k = jax.random.split(key, 5)
  params = {'w0': _normal(k[0], (8, 256), 1 / np.sqrt(8)),
            'w1': _normal(k[2], (256, 256), 1 / 16), 'w2': _normal(k[3], (256, 4), 1 / 16)}

  def net(p, x):
    h = jax.nn.gelu(x @ p['w0'])
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = jnp.tanh(h @ p['w1']) + h
    return h @ p['w2']
  return net, params, {}, _normal(k[4], (7, 8))


def _cnn_stax(readout, depth=4):
  layers = []
  for _ in range(depth):
    layers += [stax.Conv(32, (3, 3), padding='SAME', W_std=1.4, b_std=0.1), stax.Relu()]
  layers += [readout, stax.Dense(5, W_std=1.4, b_std=0.1)]
  return stax.serial(*layers)


def cnn_case(readout):
  def make(key):
    init_fn, apply_fn, _ = _cnn_stax(readout)
    x = _normal(key, (3, 6, 6, 2))
    _, params = init_fn(key, x.shape)
    return apply_fn, params, {}, x
  return make


def stax_zoo_case(key):
  """Strided and pooled convolutions, a residual sum, a channel concatenation."""
  block = stax.serial(stax.Conv(16, (3, 3), padding='SAME'), stax.Relu(),
                      stax.Conv(16, (3, 3), padding='SAME'))
  init_fn, apply_fn, _ = stax.serial(
      stax.Conv(16, (3, 3), strides=(2, 2), padding='SAME'), stax.Erf(),
      stax.FanOut(2), stax.parallel(block, stax.Identity()), stax.FanInSum(),
      stax.AvgPool((2, 2), padding='SAME'),
      stax.FanOut(2), stax.parallel(stax.Conv(8, (1, 1)), stax.Conv(8, (3, 3), padding='SAME')),
      stax.FanInConcat(), stax.Relu(), stax.Conv(3, (1, 1)), stax.GlobalAvgPool())
  x = _normal(key, (3, 8, 8, 3))
  _, params = init_fn(key, x.shape)
  return apply_fn, params, {}, x


def wide_resnet_case(key):
  """The README's WideResNet group structure at small size (block_size=1)."""
  def block(channels, strides=(1, 1), channel_mismatch=False):
    main = stax.serial(stax.Relu(), stax.Conv(channels, (3, 3), strides, padding='SAME'),
                       stax.Relu(), stax.Conv(channels, (3, 3), padding='SAME'))
    shortcut = stax.Identity() if not channel_mismatch else stax.Conv(
        channels, (3, 3), strides, padding='SAME')
    return stax.serial(stax.FanOut(2), stax.parallel(main, shortcut), stax.FanInSum())

  init_fn, apply_fn, _ = stax.serial(
      stax.Conv(16, (3, 3), padding='SAME'),
      block(16, channel_mismatch=True), block(32, (2, 2), True), block(64, (2, 2), True),
      stax.AvgPool((2, 2)), stax.Flatten(), stax.Dense(10, W_std=1., b_std=0.))
  x = _normal(key, (2, 8, 8, 3))
  _, params = init_fn(key, x.shape)
  return apply_fn, params, {}, x


CASES = {
    'mlp': mlp_case,
    'norm_gelu': norm_gelu_case,
    'cnn_flatten': cnn_case(stax.Flatten()),
    'cnn_gap': cnn_case(stax.GlobalAvgPool()),
    'stax_zoo': stax_zoo_case,
    'wide_resnet': wide_resnet_case,
}


def compute(names):
  out = {}
  for name in names:
    apply_fn, params, options, x = CASES[name](jax.random.PRNGKey(0))
    x2 = x[: max(1, x.shape[0] // 2)] + 0.1
    for dtype in (jnp.float64, jnp.float32):
      cast = jax.tree.map(lambda a: a.astype(dtype), params)
      kernel_fn = jax.jit(iw.kernelize(apply_fn, cast, **options), static_argnames='get')
      k = kernel_fn(x.astype(dtype), x2.astype(dtype), ('nngp', 'ntk'))
      out[f'{name}/{jnp.dtype(dtype).name}/nngp'] = np.asarray(k.nngp)
      out[f'{name}/{jnp.dtype(dtype).name}/ntk'] = np.asarray(k.ntk)
    k = iw.kernelize(apply_fn, params, **options)(x, None)
    out[f'{name}/cov1'] = np.asarray(k.cov1)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--compare', default=None)
  parser.add_argument('--cases', default=','.join(CASES))
  args = parser.parse_args()
  values = compute(args.cases.split(','))
  np.savez(args.out, **values)
  print(f'saved {len(values)} kernels to {args.out}')
  if args.compare:
    other = np.load(args.compare)
    worst = 0.0
    for key in sorted(values):
      if key not in other:
        print(f'{key:32s} missing in {args.compare}')
        continue
      a, b = values[key], other[key]
      scale = max(np.abs(b).max(), 1e-300)
      diff = float(np.abs(a - b).max() / scale) if a.shape == b.shape else float('inf')
      worst = max(worst, diff)
      print(f'{key:32s} shape {str(a.shape):24s} max |diff| / max |k| = {diff:.3g}')
    print(f'largest relative difference: {worst:.3g}')
    sys.exit(0 if worst == 0.0 else 1)


if __name__ == '__main__':
  main()
