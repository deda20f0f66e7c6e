"""A kernel of tens of thousands of inputs: tiles, checkpoints, CG inference.

The NNGP kernel of an infinite 3-hidden-layer ReLU network (`infwidth.stax`)
on N = 20 000 noisy samples of scikit-learn's Friedman #1 regression problem
(generated, no download), computed by `infwidth.batch` in tiles of
2500 × 2500 examples, assembled in host memory (`store_on_device=False`).
Only the tiles on and above the diagonal are computed; the others are their
transposes. The script prints the throughput in kernel entries (of the
N × N result) and tiles per second, and the kernel time against N.

Resuming: the same computation is run with a `checkpoint_dir` and stopped by
a `KeyboardInterrupt`, as from Ctrl-C, once `--interrupt_after` tiles are on
disk; a second call with the same directory loads those tiles and computes
only the rest. The script counts the tiles found on disk and the tile files
the second call writes, times it against the whole checkpointed computation
from scratch, and compares its kernel entry by entry with the uninterrupted
one.

Inference: the NNGP posterior mean on 2000 test points by
`infwidth.predict.gp_inference(..., solver='cg')` (preconditioned conjugate
gradients) for training sets up to N, against Cholesky where its O(N³) time
is affordable (N ≤ 10 000): the test MSE against the noise floor, the solve
times (compilation included), and the largest relative difference of the two
predictions next to the bound that CG's stopping rule guarantees. Last, the
CG residual at every iteration: the Nyström preconditioner (the default) on
all N points, and Nyström against Jacobi on 10 000.

--quick: N = 4000 in tiles of 500 (the same 36 tiles), 1000 test points.

Run: python examples/large_kernel.py [--quick] [--out docs/figures]
"""

import _thread
import os
import tempfile
import threading
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from infwidth import stax
from infwidth.predict import solvers

_QUICK = flags.DEFINE_bool('quick', False, 'N = 4000 instead of 20 000 (under 2 minutes).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder for the PNG figures.')
_INTERRUPT_AFTER = flags.DEFINE_integer(
    'interrupt_after', 0, 'Stop the checkpointed computation once this many '
    'tiles are on disk; 0: half of them.')

NOISE = 1.0      # standard deviation of Friedman #1's noise
DIAG_REG = 0.1   # relative to the mean of the kernel's diagonal
TOL = 1e-10      # CG relative residual (gp_inference's default)
RANK = 256       # Nyström rank (gp_inference's default)


def network():
  """Three ReLU hidden layers, NTK parameterisation (widths do not matter)."""
  layers = []
  for _ in range(3):
    layers += [stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu()]
  return stax.serial(*layers, stax.Dense(1, W_std=1.5, b_std=0.05))


def friedman(n_train, n_test, seed=0):
  """Friedman #1: 10 uniform features (5 irrelevant), noisy targets.

  Features and targets are standardised with the training statistics;
  returns the data and the noise variance in the standardised units (the
  lowest MSE any predictor can reach on the test targets).
  """
  from sklearn.datasets import make_friedman1
  x, y = make_friedman1(n_train + n_test, noise=NOISE, random_state=seed)
  mean, std = x[:n_train].mean(0), x[:n_train].std(0)
  x = (x - mean) / std
  y_mean, y_std = y[:n_train].mean(), y[:n_train].std()
  y = ((y - y_mean) / y_std)[:, None]
  return (x[:n_train], y[:n_train], x[n_train:], y[n_train:]), (NOISE / y_std) ** 2


def sidecars(directory):
  """Names of the finished tiles in a checkpoint directory."""
  return {f for f in os.listdir(directory)
          if f.startswith('tile_') and f.endswith('.json')}


def interrupted(fn, directory, after):
  """Runs `fn()` and raises KeyboardInterrupt in it (as Ctrl-C would) once
  `after` tiles are on disk. Returns whether it was interrupted."""
  done, lock = threading.Event(), threading.Lock()

  def watch():
    while not done.is_set():
      if os.path.isdir(directory) and len(sidecars(directory)) >= after:
        with lock:
          if not done.is_set():
            _thread.interrupt_main()
        return
      time.sleep(0.01)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  try:
    fn()
    with lock:
      done.set()
    return False
  except KeyboardInterrupt:
    return True
  finally:
    done.set()
    watcher.join()


def cg_residuals(k, y, preconditioner):
  """Relative residual `‖y - (K + reg I) α_i‖ / ‖y‖` of every CG iterate.

  The same solve as `gp_inference(k, y, DIAG_REG, solver='cg')`: regulariser,
  tolerance, preconditioner, Nyström rank and sketch. Preconditioned CG
  applies the preconditioner to each new residual (to `y` first, then once
  per iteration), so recording the norm of its argument gives the history.
  """
  n = k.shape[0]
  norms = []

  @jax.jit
  def solve(k, y):
    diagonal = jnp.diagonal(k)
    reg = solvers.regularizer(diagonal, DIAG_REG, False)
    if preconditioner == 'nystrom':
      p = solvers.nystrom_preconditioner(lambda v: k @ v, n, min(RANK, n // 2),
                                         reg, k.dtype, jax.random.PRNGKey(0))
    else:
      p = solvers.jacobi_preconditioner(diagonal + reg)

    def record(r):
      jax.debug.callback(lambda v: norms.append(float(v)), jnp.linalg.norm(r),
                         ordered=True)
      return p(r)
    return solvers.cg(lambda v: k @ v + reg * v, y, record, TOL)

  _, info = solve(k, y)
  jax.effects_barrier()
  norms = np.array(norms) / np.linalg.norm(y)
  return norms, int(info.iterations), float(info.residual[0])


def posterior_mean(k_train, y_train, k_test_train, solver):
  """NNGP posterior mean on the test points, `(M, 1)`."""
  predict_fn = iw.predict.gp_inference(k_train, y_train, diag_reg=DIAG_REG,
                                       solver=solver, tol=TOL)
  return np.asarray(predict_fn(get='nngp', k_test_train=k_test_train))


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  quick = _QUICK.value
  n_train, batch_size = (4000, 500) if quick else (20000, 2500)
  n_test = 1000 if quick else 2000
  chol_max = 4000 if quick else 10000
  sizes = [n_train // 2 ** k for k in range(4 if quick else 5)][::-1]
  (x, y, x_test, y_test), noise_floor = friedman(n_train, n_test)
  _, _, kernel_fn = network()
  print(f'Friedman #1: {n_train} training and {n_test} test points, 10 features; '
        f'noise floor (test mse of the true function) {noise_floor:.4f}')

  # 1. The kernel in tiles, and the time against N. ------------------------
  batched = iw.batch(kernel_fn, batch_size=batch_size, store_on_device=False,
                     progress=True)
  batched(x[:2 * batch_size], None, 'nngp')  # compile the tile functions
  nb = -(-n_train // batch_size)
  tiles = nb * (nb + 1) // 2
  kernel_times = {}
  for n in sizes:
    if n < batch_size:
      continue
    start = time.perf_counter()
    k = batched(x[:n], None, 'nngp')
    kernel_times[n] = time.perf_counter() - start
    print(f'kernel N={n}: {kernel_times[n]:.2f} s')
  t_full = kernel_times[n_train]
  print(f'kernel: {n_train}x{n_train} {k.dtype} ({k.nbytes / 2 ** 30:.2f} GiB, '
        f'{type(k).__module__.split(".")[0]}), {tiles} tiles of '
        f'{batch_size}x{batch_size} on and above the diagonal, {t_full:.1f} s')
  print(f'throughput: {n_train ** 2 / t_full:.2e} kernel entries/s, '
        f'{tiles / t_full:.2f} tiles/s')

  # 2. Interrupt a checkpointed run, then resume it. ------------------------
  # Every call gets a fresh `infwidth.batch` function, as a restarted program
  # would: each compiles its tile functions.
  def checkpointed(directory):
    return iw.batch(kernel_fn, batch_size=batch_size, store_on_device=False,
                    checkpoint_dir=directory, progress=True)

  after = _INTERRUPT_AFTER.value or tiles // 2
  with tempfile.TemporaryDirectory() as directory:
    ckpt = os.path.join(directory, 'resumed')
    start = time.perf_counter()
    stopped = interrupted(lambda: checkpointed(ckpt)(x, None, 'nngp'), ckpt, after)
    t_interrupted = time.perf_counter() - start
    on_disk = sidecars(ckpt)
    print(f'interrupted: {"KeyboardInterrupt" if stopped else "finished"} after '
          f'{t_interrupted:.1f} s with {len(on_disk)} of {tiles} tiles on disk')
    start = time.perf_counter()
    k_resumed = checkpointed(ckpt)(x, None, 'nngp')
    t_resumed = time.perf_counter() - start
    computed = sidecars(ckpt) - on_disk
    difference = float(np.max(np.abs(k_resumed - k)))
    del k_resumed
    start = time.perf_counter()
    checkpointed(os.path.join(directory, 'scratch'))(x, None, 'nngp')
    t_scratch = time.perf_counter() - start
  print(f'resumed: {len(on_disk)} tiles loaded, {len(computed)} computed, '
        f'max |difference| {difference:.1e}')
  print(f'resumed call {t_resumed:.1f} s, the whole computation with '
        f'checkpoints {t_scratch:.1f} s (without {t_full:.1f} s): '
        f'{t_scratch - t_resumed:.1f} s saved')

  # 3. GP inference by CG and by Cholesky. ----------------------------------
  k_test = iw.batch(kernel_fn, batch_size=batch_size, store_on_device=False)(
      x_test, x, 'nngp')
  rows = []
  for n in sizes:
    row = {'n': n}
    for solver in ('cg', 'cholesky'):
      if solver == 'cholesky' and n > chol_max:
        continue
      start = time.perf_counter()
      mean = posterior_mean(k[:n, :n], y[:n], k_test[:, :n], solver)
      row[solver] = (mean, time.perf_counter() - start)
    mean = row['cg'][0]
    row['mse'] = float(np.mean((mean - y_test) ** 2))
    line = f'N={n}: test mse {row["mse"]:.4f} (cg {row["cg"][1]:.1f} s'
    if 'cholesky' in row:
      chol = row['cholesky'][0]
      scale = np.max(np.abs(chol))
      row['relative'] = float(np.max(np.abs(mean - chol)) / scale)
      # CG stops at ‖r‖ ≤ tol ‖y‖, so ‖α_cg - α‖ ≤ tol ‖y‖ / reg (the smallest
      # eigenvalue of K + reg I is at least reg), and each test prediction
      # moves by at most that times the norm of its row of K_test,train.
      reg = DIAG_REG * np.mean(np.diagonal(k)[:n])
      row['bound'] = float(TOL * np.linalg.norm(y[:n]) / reg *
                           np.max(np.linalg.norm(k_test[:, :n], axis=1)) / scale)
      row['mse_cholesky'] = float(np.mean((chol - y_test) ** 2))
      line += (f', cholesky {row["cholesky"][1]:.1f} s, test mse '
               f'{row["mse_cholesky"]:.4f}, relative difference {row["relative"]:.1e}, '
               f'bound {row["bound"]:.1e}')
    print(line + ')')
    rows.append(row)
  print('test mse by N: ' + ' '.join(f'{r["mse"]:.4f}' for r in rows) +
        f' (predicting 0: {float(np.mean(y_test ** 2)):.4f}, noise floor '
        f'{noise_floor:.4f})')
  worst = max(r['relative'] for r in rows if 'relative' in r)
  fraction = max(r['relative'] / r['bound'] for r in rows if 'relative' in r)
  print(f'cg vs cholesky: max relative difference {worst:.1e} (at most '
        f'{fraction:.1e} of the bound from tol={TOL:.0e})')

  # CG residuals per iteration: Nyström on the full training set, and both
  # preconditioners on the largest set Cholesky also solved.
  runs = [(n_train, 'nystrom')] + [(chol_max, p) for p in ('nystrom', 'jacobi')
                                   if (chol_max, p) != (n_train, 'nystrom')]
  residuals = {}
  for n, preconditioner in runs:
    history, iterations, final = cg_residuals(jnp.asarray(k[:n, :n]),
                                              jnp.asarray(y[:n]), preconditioner)
    residuals[f'{preconditioner}, N={n}'] = history
    print(f'cg iterations ({preconditioner}, N={n}): {iterations}, '
          f'final relative residual {final:.1e}')
  plot(kernel_times, rows, residuals, noise_floor)


def plot(kernel_times, rows, residuals, noise_floor):
  """Times against N; test MSE against N; CG residual per iteration."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
  n = np.array(list(kernel_times))
  ax1.loglog(n, list(kernel_times.values()), 'C0o-', label='kernel (infwidth.batch)')
  ax1.loglog(n, kernel_times[n[-1]] * (n / n[-1]) ** 2, 'C0:', lw=1, label='∝ N²')
  sizes = [r['n'] for r in rows]
  ax1.loglog(sizes, [r['cg'][1] for r in rows], 'C1o-', label='CG solve + prediction')
  chol = [r for r in rows if 'cholesky' in r]
  ax1.loglog([r['n'] for r in chol], [r['cholesky'][1] for r in chol], 'C2s-',
             label='Cholesky solve + prediction')
  ax1.set_xlabel('training set size N')
  ax1.set_ylabel('seconds')
  ax1.set_title('Time against N (with compilation)')
  ax2.semilogx(sizes, [r['mse'] for r in rows], 'C1o-', label='NNGP posterior mean (CG)')
  ax2.semilogx([r['n'] for r in chol], [r['mse_cholesky'] for r in chol], 'C2x',
               ms=9, label='(Cholesky)')
  ax2.axhline(noise_floor, color='k', ls='--', lw=1, label='noise floor')
  ax2.set_xlabel('training set size N')
  ax2.set_ylabel('test MSE (standardised targets)')
  ax2.set_title('Friedman #1, 3-layer ReLU NNGP')
  for i, (name, history) in enumerate(residuals.items()):
    ax3.semilogy(history, f'C{i + 3}', label=name)
  ax3.axhline(TOL, color='k', ls='--', lw=1, label='tol')
  ax3.set_xlabel('CG iteration')
  ax3.set_ylabel('relative residual')
  ax3.set_title('CG residual by preconditioner')
  for ax in (ax1, ax2):
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  for ax in (ax1, ax2, ax3):
    ax.legend(fontsize=7)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'large_kernel.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
