"""Monte Carlo kernels converge to the analytic ones (Neural Tangents, Figure 2).

`infwidth.monte_carlo_kernel_fn` averages the empirical NNGP and NTK of
finite networks over random initialisations. Its relative error
`‖K_mc - K‖_F / ‖K‖_F` against the analytic kernel (`kernel_fn` of the same
`infwidth.stax` network) is plotted log-log against the number of samples
(one curve per width) and against the width (one curve per sample count).
The readout has as many channels as the hidden layers, so one sample already
averages over `width` outputs. Samples are independent, so the error falls as
`samples^(-1/2)`; it also falls with the width (the fitted slopes are
printed), until the O(1/width) bias of a finite network shows.

The empirical NTKs use structured derivatives per input (`vmap_axes=0`): a
Jacobian of the `width`-channel readout with respect to all parameters
would take 13 GB in float64 at width 512.

Run: python examples/monte_carlo_convergence.py [--quick] [--out docs/figures]
"""

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from infwidth import stax

_QUICK = flags.DEFINE_bool('quick', False, 'MLP only, fewer widths and samples (under 2 minutes).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder for the PNG figures.')


def mlp(width):
  return stax.serial(stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                     stax.Dense(width, W_std=1.5, b_std=0.1), stax.Relu(),
                     stax.Dense(width, W_std=1.5, b_std=0.1))


def cnn(width):
  return stax.serial(stax.Conv(width, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
                     stax.Relu(),
                     stax.Conv(width, (3, 3), padding='SAME', W_std=1.5, b_std=0.1),
                     stax.Relu(), stax.Flatten(),
                     stax.Dense(width, W_std=1.5, b_std=0.1))


def relative_errors(network, width, x, sample_counts, seeds):
  """Mean over seeds of the relative Frobenius error, `(len(sample_counts),)` per kernel."""
  init_fn, apply_fn, kernel_fn = network(width)
  exact = kernel_fn(x, None, ('nngp', 'ntk'))
  errors = {'nngp': np.zeros(len(sample_counts)), 'ntk': np.zeros(len(sample_counts))}
  for seed in range(seeds):
    mc_fn = iw.monte_carlo_kernel_fn(
        init_fn, apply_fn, jax.random.PRNGKey(seed), sample_counts, vmap_axes=0,
        implementation=iw.NtkImplementation.STRUCTURED_DERIVATIVES)
    for i, estimate in enumerate(mc_fn(x, None, ('nngp', 'ntk'))):
      for g in errors:
        k, k_mc = getattr(exact, g), getattr(estimate, g)
        errors[g][i] += float(jnp.linalg.norm(k_mc - k) / jnp.linalg.norm(k)) / seeds
  return errors


def slope(xs, ys):
  """Least-squares slope of log ys against log xs."""
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  quick = _QUICK.value
  rng = np.random.default_rng(0)
  inputs = {'MLP': (mlp, rng.normal(size=(6, 8)))}
  if quick:
    widths, sample_counts, seeds = (32, 64, 128), (1, 2, 4, 8, 16, 32), 3
  else:
    widths, sample_counts, seeds = (16, 32, 64, 128, 256, 512), (1, 2, 4, 8, 16, 32, 64, 128), 5
    inputs['CNN'] = (cnn, rng.normal(size=(4, 6, 6, 1)))

  results = {}
  for name, (network, x) in inputs.items():
    ws = widths if name == 'MLP' else widths[:4]
    results[name] = {w: relative_errors(network, w, x, sample_counts, seeds) for w in ws}
    for g in ('nngp', 'ntk'):
      table = np.array([results[name][w][g] for w in ws])  # (widths, samples)
      for w, row in zip(ws, table):
        print(f'{name} {g} width {w}: relative error ' +
              ' '.join(f'{e:.4f}' for e in row))
      print(f'{name} {g} slope in samples (width {ws[-1]}): '
            f'{slope(sample_counts, table[-1]):.3f}')
      print(f'{name} {g} slope in width ({sample_counts[0]} sample(s)): '
            f'{slope(ws, table[:, 0]):.3f}')
  plot(results, sample_counts)


def plot(results, sample_counts):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [(name, g) for name in results for g in ('nngp', 'ntk')]
  fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.4 * len(rows)), squeeze=False)
  for (name, g), (ax_s, ax_w) in zip(rows, axes):
    widths = sorted(results[name])
    for w in widths:
      ax_s.loglog(sample_counts, results[name][w][g], 'o-', ms=3, label=f'width {w}')
    ref = results[name][widths[-1]][g][0] * np.asarray(sample_counts, float) ** -0.5
    ax_s.loglog(sample_counts, ref, 'k--', lw=1, label='slope -1/2')
    ax_s.set_xlabel('samples')
    for j, n in enumerate(sample_counts):
      ax_w.loglog(widths, [results[name][w][g][j] for w in widths], 'o-', ms=3,
                  label=f'{n} samples')
    ax_w.set_xlabel('width')
    for ax in (ax_s, ax_w):
      ax.set_ylabel('relative error')
      ax.set_title(f'{name} {g.upper()}')
      ax.legend(fontsize=6)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'monte_carlo_convergence.png')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
