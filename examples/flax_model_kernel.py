"""The infinite-width kernel of a Flax CNN, and how close finite ones come.

A small convolutional classifier written in Flax linen as usual (`nn.Conv`,
`nn.relu`, `nn.avg_pool`, a mean over the pixels, `nn.Dense`) is handed to
`infwidth.kernelize` as it is: its NNGP and NTK classify scikit-learn's
bundled 8×8 digits (no download) by exact GP inference. Then the same module
at finite widths: its empirical NTK (`infwidth.empirical_ntk_fn`, with the
faster implementation for this network, timed) at initialisation and after
full-batch gradient descent on MSE, against the infinite-width NTK:

* kernel alignment `<A, B>_F / (|A|_F |B|_F)` of the empirical and the
  infinite NTK, both centred (`H K H`, `H = I - 11ᵀ/N`): most of every entry
  of these kernels is a part that all image pairs share, which would make
  any two of them align to 0.999;
* the relative change `|Θ_t - Θ_0|_F / |Θ_0|_F` of the centred empirical
  NTK in training (the uncentred one is printed too: it follows that shared
  part, which varies from network to network). The NTK's fluctuations at
  initialisation shrink as width^(-1/2); its motion under gradient flow as
  width^(-1) (Dyer & Gur-Ari 2020), so the measured slope lies in between;
* test accuracy of the trained finite networks against the infinite NNGP
  and NTK, and against the infinite network trained for as long (the mean
  over initialisations; a single finite network also keeps its random
  initial function, which costs accuracy at small widths).

Run: python examples/flax_model_kernel.py [--quick] [--out docs/figures]
"""

import math
import os
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw

_QUICK = flags.DEFINE_bool('quick', False, 'Fewer images, widths and steps (under 2 minutes).')
_OUT = flags.DEFINE_string('out', 'docs/figures', 'Folder for the PNG figures.')

W_STD = 1.5
DIAG_REG = 1e-3


class CNN(nn.Module):
  """Conv-ReLU, 2×2 average pooling, Conv-ReLU, mean over pixels, Dense(10).

  NTK parameterisation: weights are drawn from N(0, 1) and every layer's
  input is scaled by W_STD/√fan_in, so that the network has a limit as the
  width grows and one learning rate suits every width.
  """
  width: int

  @nn.compact
  def __call__(self, x):
    normal = nn.initializers.normal(1.)

    def conv(x):
      x = x * (W_STD / math.sqrt(9 * x.shape[-1]))
      return nn.Conv(self.width, (3, 3), padding='SAME', kernel_init=normal)(x)

    x = nn.relu(conv(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(conv(x))
    x = x.mean(axis=(1, 2))
    x = x * (W_STD / math.sqrt(x.shape[-1]))
    return nn.Dense(10, kernel_init=normal)(x)


def param_stats(variables):
  """The exact moments of the initialisation: kernels N(0, 1), biases 0."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: iw.ParamStats(0., 1. if path[-1].key == 'kernel' else 0.), variables)


def digits(n_train, n_test, seed=0):
  """Standardised 8×8×1 images and one-hot targets shifted to mean zero."""
  from sklearn.datasets import load_digits
  data = load_digits()
  x = (data.images / 16. - 0.5)[..., None] * 2.
  y = np.eye(10)[data.target] - 0.1
  order = np.random.default_rng(seed).permutation(len(x))
  train, test = order[:n_train], order[n_train:n_train + n_test]
  return x[train], y[train], x[test], y[test]


def accuracy(f, y):
  return float(np.mean(np.argmax(f, 1) == np.argmax(y, 1)))


def centred(k):
  """H K H with H = I - 11ᵀ/N: the kernel of the outputs less their mean."""
  return k - k.mean(0) - k.mean(1)[:, None] + k.mean()


def alignment(a, b):
  """<A, B>_F / (|A|_F |B|_F) of the centred kernels: 1 for kernels equal up to scale.

  Uncentred, the entry that every pair of images shares (after ReLUs and
  pooling, most of each entry) makes any two such kernels align to 0.999.
  """
  a, b = centred(a), centred(b)
  return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def relative_change(k_t, k_0):
  return float(np.linalg.norm(k_t - k_0) / np.linalg.norm(k_0))


def loss(f, y):
  """0.5 · mean squared error: the loss whose gradient flow predict models."""
  return 0.5 * jnp.mean((f - y) ** 2)


def train(model, variables, x, y, learning_rate, n_steps):
  """Full-batch gradient descent on `loss`; returns the trained variables."""
  grad_fn = jax.grad(lambda v: loss(model.apply(v, x), y))
  step = jax.jit(lambda v: jax.tree.map(lambda a, g: a - learning_rate * g, v, grad_fn(v)))
  for _ in range(n_steps):  # XLA:CPU runs convolutions inside a loop primitive far slower
    variables = step(variables)
  return variables


def fastest_ntk_fn(model, variables, x):
  """The empirical NTK implementation that is fastest here, timed on `x`."""
  times = {}
  for implementation in (iw.NtkImplementation.JACOBIAN_CONTRACTION,
                         iw.NtkImplementation.NTK_VECTOR_PRODUCTS,
                         iw.NtkImplementation.STRUCTURED_DERIVATIVES):
    ntk_fn = jax.jit(iw.empirical_ntk_fn(model.apply, vmap_axes=0, implementation=implementation))
    ntk_fn(x, None, variables).block_until_ready()   # compile
    start = time.perf_counter()
    ntk_fn(x, None, variables).block_until_ready()
    times[implementation] = time.perf_counter() - start
  best = min(times, key=times.get)
  print(f'empirical NTK of {len(x)} images, width {model.width}: ' +
        ', '.join(f'{i.name} {t:.2f} s' for i, t in times.items()) + f'; using {best.name}')
  return best


def main(argv):
  del argv
  jax.config.update('jax_enable_x64', True)
  quick = _QUICK.value
  n_train, n_test = (100, 200) if quick else (100, 500)
  widths = (32, 64, 128) if quick else (32, 64, 128, 256)
  n_networks = 1 if quick else 2   # per width
  n_steps = 1000
  x_train, y_train, x_test, y_test = digits(n_train, n_test)

  # The infinite-width limit: one kernel for every width (NTK parameterisation).
  model = CNN(widths[0])
  variables = model.init(jax.random.PRNGKey(0), x_train[:1])
  kernel_fn = iw.batch(iw.kernelize(model.apply, variables, param_stats=param_stats(variables)),
                       batch_size=50)
  start = time.perf_counter()
  k_dd = kernel_fn(x_train, None, ('nngp', 'ntk'))
  k_td = kernel_fn(x_test, x_train, ('nngp', 'ntk'))
  print(f'infinite-width NNGP and NTK of {n_train} + {n_test} images: '
        f'{time.perf_counter() - start:.1f} s')
  predict_fn = iw.predict.gp_inference(k_dd, y_train, diag_reg=DIAG_REG)
  inf_accuracy = {}
  for g in ('nngp', 'ntk'):
    inf_accuracy[g] = accuracy(predict_fn(get=g, k_test_train=getattr(k_td, g)), y_test)
    print(f'infinite {g.upper()} test accuracy {inf_accuracy[g]:.3f}')
  # The infinite network trained like the finite ones below, for as long
  # (the mean over initialisations: outputs start at 0).
  learning_rate = 0.5 * float(iw.predict.max_learning_rate(k_dd.ntk, y_train.size))
  mse_fn = iw.predict.gradient_descent_mse(k_dd.ntk, y_train, learning_rate)
  _, f_test = mse_fn(n_steps, np.zeros_like(y_train), np.zeros_like(y_test), k_td.ntk)
  inf_accuracy['ntk_t'] = accuracy(f_test, y_test)
  print(f'infinite NTK after {n_steps} steps (learning rate {learning_rate:.3f}) '
        f'test accuracy {inf_accuracy["ntk_t"]:.3f}')

  # Finite networks, trained in float32.
  x32, y32, xt32 = (jnp.asarray(a, jnp.float32) for a in (x_train, y_train, x_test))
  ntk_inf = np.asarray(k_dd.ntk)
  implementation = None
  results = {}
  seed = 1
  for width in widths:
    model = CNN(width)
    runs = []
    for _ in range(n_networks):
      variables = model.init(jax.random.PRNGKey(seed), x32[:1])
      seed += 1
      if implementation is None:
        implementation = fastest_ntk_fn(model, variables, x32[:25])
      ntk_fn = jax.jit(iw.empirical_ntk_fn(model.apply, vmap_axes=0,
                                           implementation=implementation))
      ntk_0 = np.asarray(ntk_fn(x32, None, variables), np.float64)
      trained = train(model, variables, x32, y32, learning_rate, n_steps)
      start = time.perf_counter()   # compiled by now
      ntk_t = np.asarray(ntk_fn(x32, None, trained), np.float64)
      ntk_time = time.perf_counter() - start
      runs.append(dict(
          align_0=alignment(ntk_0, ntk_inf), align_t=alignment(ntk_t, ntk_inf),
          change=relative_change(centred(ntk_t), centred(ntk_0)),
          change_uncentred=relative_change(ntk_t, ntk_0),
          train_loss=float(loss(model.apply(trained, x32), y32)),
          accuracy=accuracy(model.apply(trained, xt32), y_test)))
    results[width] = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    r = results[width]
    print(f'width {width}: alignment at init {r["align_0"]:.4f}, after training '
          f'{r["align_t"]:.4f}, relative change {r["change"]:.4f} (uncentred '
          f'{r["change_uncentred"]:.4f}), train loss {r["train_loss"]:.4f}, test accuracy '
          f'{r["accuracy"]:.3f} (mean of {n_networks}; empirical NTK of {n_train} images '
          f'{ntk_time:.1f} s)')
  changes = [results[w]['change'] for w in widths]
  slope = np.polyfit(np.log(widths), np.log(changes), 1)[0]
  print(f'slope of relative change in width: {slope:.2f}')
  plot(widths, results, inf_accuracy, n_steps, slope)


def plot(widths, results, inf_accuracy, n_steps, slope):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
  get = lambda key: [results[w][key] for w in widths]
  ax1.semilogx(widths, get('align_0'), 'C0o-', label='at initialisation')
  ax1.semilogx(widths, get('align_t'), 'C3o-', label=f'after {n_steps} steps')
  ax1.set_title('alignment of empirical and infinite NTK (centred)')
  ax2.loglog(widths, get('change'), 'C2o-', label=f'centred (slope {slope:.2f})')
  ax2.loglog(widths, get('change_uncentred'), 'C7o-', label='uncentred')
  ratio = np.asarray(widths, float) / widths[0]
  for power, style in ((0.5, 'k:'), (1., 'k--')):
    ax2.loglog(widths, get('change')[0] * ratio ** -power, style, label=f'∝ width^(-{power:g})')
  ax2.set_title(f'|Θ_t - Θ_0| / |Θ_0| after {n_steps} steps')
  ax3.semilogx(widths, get('accuracy'), 'C1o-', label=f'finite, {n_steps} steps')
  for key, colour, ls, name in (('nngp', 'C0', '--', 'infinite NNGP'),
                                ('ntk', 'C3', '--', 'infinite NTK'),
                                ('ntk_t', 'C3', ':', f'infinite NTK, {n_steps} steps')):
    ax3.axhline(inf_accuracy[key], color=colour, ls=ls, label=name)
  ax3.set_title('test accuracy')
  for ax in (ax1, ax2, ax3):
    ax.set_xlabel('width (channels)')
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=7)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, 'flax_model_kernel.png')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
