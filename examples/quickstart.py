"""Quickstart: the infinite-width kernels of a plain-JAX MLP, and GP inference.

Computes the NNGP and NTK of an infinitely wide 3-layer ReLU network written in
ordinary JAX, then uses them for exact Bayesian inference and for the
predictions of an infinite ensemble trained by gradient descent, on a small
built-in regression problem (noisy samples of a 1-D function lifted to 8-D).

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw

jax.config.update('jax_enable_x64', True)


def mlp(params, x):
  """A plain-JAX MLP: no special layers, any widths."""
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def init_mlp(key, widths, w_std=1.5, b_std=0.05):
  """Standard parameterisation: W ~ N(0, w_std²/fan_in), b ~ N(0, b_std²)."""
  params = []
  for fan_in, fan_out in zip(widths[:-1], widths[1:]):
    key, kw, kb = jax.random.split(key, 3)
    params.append((w_std / np.sqrt(fan_in) * jax.random.normal(kw, (fan_in, fan_out)),
                   b_std * jax.random.normal(kb, (fan_out,))))
  return params


def dataset(n_train=64, n_test=128, dim=8, noise=0.05, seed=0):
  """y = sin(3t) + t/2 observed at random points t, embedded in `dim` dimensions."""
  rng = np.random.default_rng(seed)
  direction = rng.normal(size=dim)
  direction /= np.linalg.norm(direction)
  def make(t):
    x = np.outer(t, direction) + 0.1 * rng.normal(size=(t.size, dim))
    return x, (np.sin(3 * t) + t / 2)[:, None]
  x_train, y_train = make(rng.uniform(-2, 2, n_train))
  y_train = y_train + noise * rng.normal(size=y_train.shape)
  x_test, y_test = make(np.linspace(-2, 2, n_test))
  return x_train, y_train, x_test, y_test


def main():
  x_train, y_train, x_test, y_test = dataset()
  widths = (x_train.shape[1], 512, 512, 1)
  params = init_mlp(jax.random.PRNGKey(0), widths)
  # Exact moments of the initialisation: the kernel is then the exact limit.
  stats = [(iw.ParamStats(0., 1.5 ** 2 / fan_in), iw.ParamStats(0., 0.05 ** 2))
           for fan_in in widths[:-1]]

  kernel_fn = jax.jit(iw.kernelize(mlp, params, param_stats=stats), static_argnames='get')
  k_train = kernel_fn(x_train, None, ('nngp', 'ntk'))
  print(f'NNGP train kernel {k_train.nngp.shape}, NTK train kernel {k_train.ntk.shape}')
  print('min eigenvalues (PSD):', float(jnp.linalg.eigvalsh(k_train.nngp).min()),
        float(jnp.linalg.eigvalsh(k_train.ntk).min()))

  # Exact GP posterior with the NNGP kernel, and the infinite ensemble of
  # networks trained to convergence by gradient descent (NTK).
  predict_fn = iw.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train,
                                                        diag_reg=1e-4)
  nngp_mean, nngp_cov = predict_fn(x_test=x_test, get='nngp', compute_cov=True)
  ntk_mean = predict_fn(x_test=x_test, get='ntk')
  rmse = lambda m: float(jnp.sqrt(jnp.mean((m - y_test) ** 2)))
  print(f'test RMSE: NNGP posterior {rmse(nngp_mean):.3f}, trained ensemble (NTK) '
        f'{rmse(ntk_mean):.3f}, predicting zero {rmse(0 * y_test):.3f}')
  print(f'mean posterior std: {float(jnp.sqrt(jnp.diag(nngp_cov)).mean()):.3f}')
  # Finite training time: the ensemble after t steps of gradient descent.
  for t in (1e1, 1e3, None):
    mean = predict_fn(t=t, x_test=x_test, get='ntk')
    print(f'  t={t}: test RMSE {rmse(mean):.3f}')


if __name__ == '__main__':
  main()
