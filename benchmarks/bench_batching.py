"""Throughput of `infwidth.batch` against `batch_size` for a small CNN kernel.

`infwidth.kernelize` has no rule for `conv_general_dilated` yet, so the kernel
function here is the closed-form NNGP/NTK of a conv-ReLU network written
directly in JAX: `depth` × (3×3 SAME convolution, ReLU), then Flatten and a
dense readout, in NTK parameterization. With a Flatten readout only the
spatial diagonal of each covariance is needed (as in Neural Tangents): a 3×3
convolution averages the `(N1, N2, H, W)` covariance over each 3×3
neighbourhood, and ReLU applies the arc-cosine kernel of degree 1 per pixel.

For each `batch_size` it reports, after one warm-up call (compilation):
  * entries/s of the full `N × N` kernel with `x2=None` (only tiles on and
    above the diagonal are computed, so this can beat the single call);
  * entries/s with `x2` a copy of `x1` (every tile computed: the honest
    overhead of tiling);
and the ratio of the best batched time to the single unbatched call's time.
The last column is the largest difference from the single call relative to
the kernel's largest entry; in float32 it is dominated by diagonal entries,
where `arccos` at correlation 1 amplifies rounding to about `sqrt(eps)`
(off-diagonal entries agree to rounding).

Run: `PYTHONPATH=. python benchmarks/bench_batching.py [--n 192] [--repeats 2]`.
"""

import argparse
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from infwidth.kernel import Kernel

W_STD, B_STD = 1.4, 0.1


def _box3(k: jax.Array) -> jax.Array:
  """Mean over each 3×3 spatial neighbourhood (zero padding), last two axes."""
  window = (1,) * (k.ndim - 2) + (3, 3)
  s = jax.lax.reduce_window(k, 0., jax.lax.add, window, (1,) * k.ndim, 'SAME')
  return s / 9


def _relu(k12, k11, k22):
  """Arc-cosine kernel of degree 1 and its derivative, elementwise."""
  norms = jnp.sqrt(k11 * k22)
  cos = jnp.clip(k12 / norms, -1, 1)
  theta = jnp.arccos(cos)
  t = norms * (jnp.sqrt(1 - cos**2) + (jnp.pi - theta) * cos) / (2 * jnp.pi)
  return t, (jnp.pi - theta) / (2 * jnp.pi)


def cnn_kernel_fn(x1: jax.Array, x2: Optional[jax.Array] = None,
                  get: Any = None, depth: int = 4) -> Any:
  """NNGP/NTK of `depth` conv3x3-ReLU layers, Flatten, Dense.

  Args:
    x1: `(N1, H, W, C)` images.
    x2: `(N2, H, W, C)` images or None (then `x2 = x1`).
    get: `'nngp'`, `'ntk'`, a tuple of them, or None for a `Kernel`.
    depth: number of conv-ReLU layers.

  Returns:
    `(N1, N2)` kernels as selected by `get`.
  """
  y2 = x1 if x2 is None else x2
  c = x1.shape[-1]
  lin = lambda p: W_STD**2 * _box3(p) + B_STD**2
  k12 = lin(jnp.einsum('ahwc,bhwc->abhw', x1, y2) / c)
  k11 = lin(jnp.einsum('ahwc,ahwc->ahw', x1, x1) / c)
  k22 = lin(jnp.einsum('ahwc,ahwc->ahw', y2, y2) / c)
  ntk = k12
  for layer in range(depth):
    t, t_dot = _relu(k12, k11[:, None], k22[None, :])
    if layer < depth - 1:
      k12, ntk = lin(t), lin(t) + W_STD**2 * _box3(t_dot * ntk)
      k11, k22 = lin(k11 / 2), lin(k22 / 2)
  # Flatten + Dense: average over pixels.
  nngp = W_STD**2 * t.mean((-2, -1)) + B_STD**2
  ntk = nngp + W_STD**2 * (t_dot * ntk).mean((-2, -1))
  cov = lambda k: W_STD**2 * (k / 2).mean((-2, -1)) + B_STD**2
  k = Kernel(nngp=nngp, ntk=ntk, cov1=cov(k11),
             cov2=None if x2 is None else cov(k22), x1_is_x2=x2 is None,
             shape1=(x1.shape[0], 1), shape2=(y2.shape[0], 1))
  return k if get is None else k.get(get)


def _best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=192)
  parser.add_argument('--size', type=int, default=16)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--batch-sizes', type=str, default='8,16,32,64,96')
  args = parser.parse_args()
  x = np.random.RandomState(0).randn(args.n, args.size, args.size, 3).astype(np.float32)
  x_copy = x.copy()
  get = ('nngp', 'ntk')
  entries = args.n**2
  print(f'jax {jax.__version__}, devices: {jax.devices()}')
  print(f'kernel: {args.depth} x (conv3x3, ReLU), Flatten, Dense; '
        f'x: {x.shape} float32; get={get}')

  single = jax.jit(cnn_kernel_fn, static_argnames=('get', 'depth'))
  t_single = _best_time(lambda: single(x, None, get, depth=args.depth), args.repeats)
  t_single_full = _best_time(lambda: single(x, x_copy, get, depth=args.depth),
                             args.repeats)
  ref = np.asarray(single(x, None, get, depth=args.depth).ntk)
  print(f'single call, x2=None:  {t_single:8.3f} s  '
        f'{entries / t_single:12.0f} entries/s')
  print(f'single call, x2=copy:  {t_single_full:8.3f} s  '
        f'{entries / t_single_full:12.0f} entries/s')
  print(f'{"batch_size":>10} {"tiles":>6} {"x2=None s":>10} {"entries/s":>12} '
        f'{"x2=copy s":>10} {"entries/s":>12} {"max rel err":>12}')
  best = {}
  for bs in [int(b) for b in args.batch_sizes.split(',')]:
    fn = iw.batch(cnn_kernel_fn, bs, progress=False)
    t_tri = _best_time(lambda: fn(x, None, get, depth=args.depth), args.repeats)
    t_full = _best_time(lambda: fn(x, x_copy, get, depth=args.depth), args.repeats)
    err = np.max(np.abs(np.asarray(fn(x, None, get, depth=args.depth).ntk) - ref)
                 ) / np.max(np.abs(ref))
    nb = -(-args.n // bs)
    print(f'{bs:>10} {nb * (nb + 1) // 2:>6} {t_tri:>10.3f} '
          f'{entries / t_tri:>12.0f} {t_full:>10.3f} {entries / t_full:>12.0f} '
          f'{err:>12.1e}')
    best[bs] = (t_tri, t_full)
  bs_tri = min(best, key=lambda b: best[b][0])
  bs_full = min(best, key=lambda b: best[b][1])
  print(f'best batch_size, x2=None: {bs_tri}: batched/single time = '
        f'{best[bs_tri][0] / t_single:.2f}')
  print(f'best batch_size, x2=copy: {bs_full}: batched/single time = '
        f'{best[bs_full][1] / t_single_full:.2f} (tiling overhead)')


if __name__ == '__main__':
  main()
