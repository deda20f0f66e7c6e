"""NNGP and NTK inference for three architectures (Neural Tangents, Figure 3).

Test accuracy and MSE of exact NNGP inference and of the infinite ensemble
trained to convergence (NTK) against training-set size, on scikit-learn's
bundled 8×8 digits (no download), for a fully connected network, a CNN read
out by Flatten and the same CNN read out by global average pooling. Also the
negative log marginal likelihood per target entry (`infwidth.predict.
marginal_log_likelihood`, lower is better) of each architecture on the
largest training set. The ordering of architectures is printed as measured.

Run: python examples/architecture_comparison.py [--quick] [--out docs/figures]
"""

import collections
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from infwidth import stax

_QUICK = flags.DEFINE_bool('quick', False, 'Smaller training and test sets (under 2 minutes).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder for the PNG figures.')

Kernels = collections.namedtuple('Kernels', ['nngp', 'ntk'])
DIAG_REG = 1e-3


def architectures():
  """Name -> stax kernel_fn. Widths are irrelevant to the NTK-parameterised limit."""
  def conv_block():
    return [stax.Conv(64, (3, 3), padding='SAME', W_std=1.5, b_std=0.05), stax.Relu(),
            stax.Conv(64, (3, 3), padding='SAME', W_std=1.5, b_std=0.05), stax.Relu()]
  return {
      'FC': stax.serial(stax.Flatten(), stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
                        stax.Dense(512, W_std=1.5, b_std=0.05), stax.Relu(),
                        stax.Dense(10, W_std=1.5, b_std=0.05))[2],
      'CNN-Flatten': stax.serial(*conv_block(), stax.Flatten(),
                                 stax.Dense(10, W_std=1.5, b_std=0.05))[2],
      'CNN-GAP': stax.serial(*conv_block(), stax.GlobalAvgPool(),
                             stax.Dense(10, W_std=1.5, b_std=0.05))[2],
  }


def digits(n_train, n_test, seed=0):
  """Standardised 8×8×1 images and one-hot targets shifted to mean zero."""
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16. - 0.5)[..., None] * 2.
  y = np.eye(10)[data.target] - 0.1
  order = np.random.default_rng(seed).permutation(len(x))
  train, test = order[:n_train], order[n_train:n_train + n_test]
  return x[train], y[train], x[test], y[test]


def evaluate(kernel_fn, data, train_sizes):
  """Accuracy, MSE per training size and -log p(y)/size on the largest set."""
  x_train, y_train, x_test, y_test = data
  kernel_fn = iw.batch(kernel_fn, batch_size=50)
  k_dd = kernel_fn(x_train, None, ('nngp', 'ntk'))
  k_td = kernel_fn(x_test, x_train, ('nngp', 'ntk'))
  scores = {g: {'accuracy': [], 'mse': []} for g in ('nngp', 'ntk')}
  for n in train_sizes:
    predict_fn = iw.predict.gp_inference(
        Kernels(k_dd.nngp[:n, :n], k_dd.ntk[:n, :n]), y_train[:n], diag_reg=DIAG_REG)
    for g in scores:
      mean = predict_fn(get=g, k_test_train=getattr(k_td, g)[:, :n])
      scores[g]['accuracy'].append(float(jnp.mean(mean.argmax(1) == y_test.argmax(1))))
      scores[g]['mse'].append(float(jnp.mean((mean - y_test) ** 2)))
  nll = {g: -float(iw.predict.marginal_log_likelihood(
      getattr(k_dd, g), y_train, diag_reg=DIAG_REG)) / y_train.size for g in scores}
  return scores, nll


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  train_sizes = (25, 50, 100, 200) if _QUICK.value else (25, 50, 100, 200, 400, 800)
  n_test = 200 if _QUICK.value else 500
  data = digits(train_sizes[-1], n_test)
  results = {}
  for name, kernel_fn in architectures().items():
    scores, nll = evaluate(kernel_fn, data, train_sizes)
    results[name] = (scores, nll)
    for g in ('nngp', 'ntk'):
      print(f'{name} {g}: accuracy ' + ' '.join(f'{a:.3f}' for a in scores[g]['accuracy']) +
            ' | mse ' + ' '.join(f'{m:.4f}' for m in scores[g]['mse']) +
            f' | -log p(y)/size {nll[g]:.4f}')
  # Binomial standard error of an accuracy near the measured ones.
  best = max(r[0]['nngp']['accuracy'][-1] for r in results.values())
  print(f'accuracy standard error on {n_test} test images: ±{np.sqrt(best * (1 - best) / n_test):.3f}')
  for g in ('nngp', 'ntk'):
    order = sorted(results, key=lambda a: -results[a][0][g]['accuracy'][-1])
    print(f'{g} ordering by accuracy at {train_sizes[-1]} examples: ' + ' > '.join(order))
    order = sorted(results, key=lambda a: results[a][1][g])
    print(f'{g} ordering by marginal likelihood: ' + ' > '.join(order))
  plot(results, train_sizes)


def plot(results, train_sizes):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for i, (name, (scores, nll)) in enumerate(results.items()):
    for g, style in (('nngp', '-'), ('ntk', '--')):
      axes[0].semilogx(train_sizes, scores[g]['accuracy'], f'C{i}{style}o', ms=3,
                       label=f'{name} {g.upper()}')
      axes[1].loglog(train_sizes, scores[g]['mse'], f'C{i}{style}o', ms=3,
                     label=f'{name} {g.upper()}')
    axes[2].bar([3 * i, 3 * i + 1], [nll['nngp'], nll['ntk']], color=f'C{i}')
  axes[0].set_title('test accuracy')
  axes[1].set_title('test MSE')
  axes[2].set_title(f'-log p(y) / size, {train_sizes[-1]} examples')
  axes[2].set_xticks([3 * i + j for i in range(len(results)) for j in (0, 1)])
  axes[2].set_xticklabels([f'{n}\n{g}' for n in results for g in ('NNGP', 'NTK')], fontsize=7)
  for ax in axes[:2]:
    ax.set_xlabel('training set size')
    ax.legend(fontsize=7)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'architecture_comparison.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
