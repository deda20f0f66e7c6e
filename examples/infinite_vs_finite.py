"""Infinite networks against ensembles of finite ones (Neural Tangents, Figure 1).

A 1-D regression problem (a few noisy samples of sin(x)): the NNGP posterior,
the infinite ensemble trained by gradient descent on MSE (NTK, mean ± 2σ), and
ensembles of finite networks of two widths trained by plain gradient descent
from independent initialisations; then the train and test loss over training
time for the infinite ensemble and the finite ensembles' mean loss.

The learning rate is 3/4 of the largest stable one, `2N / λ_max` of the NTK on
the N training points (loss 0.5 · mean squared error), and every run trains
for the same time `learning_rate × steps`; the finite networks train in
float32.

Run: python examples/infinite_vs_finite.py [--quick] [--out docs/figures]
"""

import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
from infwidth import stax

_QUICK = flags.DEFINE_bool('quick', False, '20 networks of widths 128 and 512 (under 2 minutes).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder for the PNG figures.')

TRAINING_TIME = 250.  # learning rate × steps
NOISE = 0.1


def dataset(n_train=5, n_test=50, seed=10):
  """Noisy samples of sin(x) on [-π, π] and the noiseless curve on a grid."""
  rng = np.random.default_rng(seed)
  x_train = rng.uniform(-np.pi, np.pi, (n_train, 1))
  y_train = np.sin(x_train) + NOISE * rng.normal(size=(n_train, 1))
  x_test = np.linspace(-np.pi, np.pi, n_test)[:, None]
  return x_train, y_train, x_test, np.sin(x_test)


def network(width):
  """Two hidden Erf layers, NTK parameterisation (the paper's architecture)."""
  return stax.serial(
      stax.Dense(width, W_std=1.5, b_std=0.05), stax.Erf(),
      stax.Dense(width, W_std=1.5, b_std=0.05), stax.Erf(),
      stax.Dense(1, W_std=1.5, b_std=0.05))


def loss(f, y):
  """0.5 · mean squared error: the loss whose gradient flow predict models."""
  return 0.5 * jnp.mean((f - y) ** 2)


def train_ensemble(width, n_networks, n_steps, n_records, learning_rate, data, seed=0):
  """Gradient descent on `n_networks` independent initialisations.

  Returns the test outputs after training `(networks, n_test, 1)` and the
  train/test loss of every network at `n_records` evenly spaced steps.
  """
  x_train, y_train, x_test, y_test = (jnp.asarray(a, jnp.float32) for a in data)
  init_fn, apply_fn, _ = network(width)
  keys = jax.random.split(jax.random.PRNGKey(seed), n_networks)
  params = jax.vmap(lambda k: init_fn(k, x_train.shape)[1])(keys)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  grad_fn = jax.grad(lambda p: loss(apply_fn(p, x_train), y_train))
  every = n_steps // n_records

  def record(p):
    return loss(apply_fn(p, x_train), y_train), loss(apply_fn(p, x_test), y_test)

  def train_one(p):
    def chunk(p, _):
      p = jax.lax.fori_loop(0, every, lambda _, q: jax.tree.map(
          lambda a, g: a - learning_rate * g, q, grad_fn(q)), p)
      return p, record(p)
    p, losses = jax.lax.scan(chunk, p, None, length=n_records)
    return apply_fn(p, x_test), losses

  return jax.jit(jax.vmap(train_one))(params)


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  quick = _QUICK.value
  widths = (128, 512) if quick else (512, 2048)
  n_networks = 20 if quick else 100
  n_records = 20 if quick else 50
  data = dataset()
  x_train, y_train, x_test, y_test = data

  # The infinite network: its NNGP/NTK do not depend on the width given.
  _, _, kernel_fn = network(512)
  lambda_max = float(np.linalg.eigvalsh(np.asarray(kernel_fn(x_train, None, 'ntk')))[-1])
  learning_rate = 0.75 * 2 * y_train.size / lambda_max
  n_steps = n_records * int(np.ceil(TRAINING_TIME / learning_rate / n_records))
  print(f'NTK λ_max on the training set {lambda_max:.2f}: learning rate '
        f'{learning_rate:.4f}, {n_steps} steps')
  predict_fn = iw.predict.gradient_descent_mse_ensemble(
      kernel_fn, x_train, y_train, learning_rate=learning_rate, diag_reg=1e-4)
  nngp = predict_fn(x_test=x_test, get='nngp', compute_cov=True)
  ntk = predict_fn(t=n_steps, x_test=x_test, get='ntk', compute_cov=True)
  std = lambda g: np.sqrt(np.maximum(np.diag(g.covariance), 0.))

  # Expected loss of the ensemble over time: (mean error)² plus variance.
  steps = (np.arange(1, n_records + 1) * (n_steps // n_records)).astype(float)
  ts = steps * 1.0
  train_t = predict_fn(t=ts, get='ntk', compute_cov=True)
  test_t = predict_fn(t=ts, x_test=x_test, get='ntk', compute_cov=True)
  expected = lambda g, y: np.array([
      float(loss(g.mean[i], y)) + 0.5 * float(jnp.mean(jnp.diagonal(g.covariance[i])))
      for i in range(len(ts))])
  inf_train, inf_test = expected(train_t, y_train), expected(test_t, y_test)
  print(f'infinite ensemble (NTK) after {n_steps} steps: train loss {inf_train[-1]:.4f}, '
        f'test loss {inf_test[-1]:.4f}')
  print(f'NNGP posterior: test loss of the mean {float(loss(nngp.mean, y_test)):.4f}')

  finite = {}
  for width in widths:
    f_test, (tr, te) = train_ensemble(width, n_networks, n_steps, n_records,
                                      learning_rate, data)
    f_test = np.asarray(f_test, np.float64)
    finite[width] = (f_test, np.asarray(tr).mean(0), np.asarray(te).mean(0))
    mean_gap = np.abs(f_test.mean(0) - np.asarray(ntk.mean)).max()
    std_ratio = f_test.std(0).mean() / std(ntk).mean()
    print(f'width {width}: {n_networks} networks, train loss {finite[width][1][-1]:.4f}, '
          f'test loss {finite[width][2][-1]:.4f}, max |ensemble mean - NTK mean| '
          f'{mean_gap:.4f}, ensemble std / NTK std {std_ratio:.3f}, '
          f'infinite / finite test loss {inf_test[-1] / finite[width][2][-1]:.3f}')

  plot(data, nngp, ntk, std, finite, steps, inf_train, inf_test, n_networks)


def plot(data, nngp, ntk, std, finite, steps, inf_train, inf_test, n_networks):
  """Left: predictions with ±2σ bands. Right: loss over training steps."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  x_train, y_train, x_test, y_test = data
  x = x_test[:, 0]
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
  for ax in (ax1, ax2):
    ax.plot(x, y_test[:, 0], 'k--', lw=1, label='sin(x)')
    ax.plot(x_train[:, 0], y_train[:, 0], 'ko', label='train')
  for g, name, colour in ((nngp, 'NNGP posterior', 'C0'), (ntk, 'NTK ensemble', 'C3')):
    m, s = np.asarray(g.mean)[:, 0], std(g)
    ax1.plot(x, m, colour, label=name)
    ax1.fill_between(x, m - 2 * s, m + 2 * s, color=colour, alpha=0.2)
  ax1.set_title('Infinite width: mean ± 2σ')
  m, s = np.asarray(ntk.mean)[:, 0], std(ntk)
  ax2.plot(x, m, 'C3', label='NTK ensemble (infinite)')
  ax2.fill_between(x, m - 2 * s, m + 2 * s, color='C3', alpha=0.15)
  for i, (width, (f_test, _, _)) in enumerate(finite.items()):
    fm, fs = f_test.mean(0)[:, 0], f_test.std(0)[:, 0]
    ax2.plot(x, fm, f'C{i + 1}', label=f'{n_networks} trained nets, width {width}')
    ax2.plot(x, fm - 2 * fs, f'C{i + 1}:', x, fm + 2 * fs, f'C{i + 1}:')
  ax2.set_title('Finite ensembles vs infinite (after training)')
  ax3.loglog(steps, inf_train, 'C3', label='infinite, train')
  ax3.loglog(steps, inf_test, 'C3--', label='infinite, test')
  for i, (width, (_, tr, te)) in enumerate(finite.items()):
    ax3.loglog(steps, tr, f'C{i + 1}o', ms=3, label=f'width {width}, train')
    ax3.loglog(steps, te, f'C{i + 1}x', ms=4, label=f'width {width}, test')
  ax3.set_xlabel('gradient descent steps')
  ax3.set_ylabel('mean loss')
  ax3.set_title('Loss during training')
  for ax in (ax1, ax2, ax3):
    ax.legend(fontsize=7)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'infinite_vs_finite.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
