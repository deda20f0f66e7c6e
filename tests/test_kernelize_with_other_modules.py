"""kernelize together with the rest of the library: batching, Monte Carlo
kernels, and the reductions that LayerNorm-style code writes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

D = 4
X1 = jax.random.normal(jax.random.PRNGKey(0), (7, D))
X2 = jax.random.normal(jax.random.PRNGKey(1), (5, D))


def mlp(params, x):
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w / np.sqrt(w.shape[0]) + b)
  w, b = params[-1]
  return x @ w / np.sqrt(w.shape[0]) + b


def init(key, width, out=8):
  dims = (D, width, width, out)
  params = []
  for fan_in, fan_out in zip(dims[:-1], dims[1:]):
    key, kw, kb = jax.random.split(key, 3)
    params.append((jax.random.normal(kw, (fan_in, fan_out)), 0.1 * jax.random.normal(kb, (fan_out,))))
  return params


STATS = [(iw.ParamStats(0., 1.), iw.ParamStats(0., 0.01))] * 3


def test_batched_kernelize_equals_unbatched():
  # Second implementation: the same kernel in one call; ragged tiles of 3.
  kernel_fn = iw.kernelize(mlp, init(jax.random.PRNGKey(2), 16), param_stats=STATS)
  for x2 in (None, X2):
    want = kernel_fn(X1, x2, ('nngp', 'ntk'))
    got = iw.batch(kernel_fn, batch_size=3, device_count=0)(X1, x2, ('nngp', 'ntk'))
    np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_monte_carlo_converges_to_kernelize():
  # The NT paper's Figure 2 made small: Monte Carlo estimates at growing
  # width and sample count approach the analytic kernel, and improve on width
  # 8 with 2 samples. Tolerances at width 256, 32 samples, 8 logits: the NNGP
  # of one draw is a GP sample, relative SE per entry ≈ √(2/(32·8)) ≈ 9 %, so
  # the worst of 35 entries stays within ~3.5 SE (0.3); the NTK concentrates
  # with width (relative error O(1/√n) per draw): 5 %.
  analytic = iw.kernelize(mlp, init(jax.random.PRNGKey(2), 16), param_stats=STATS)(
      X1, X2, ('nngp', 'ntk'))

  def init_fn(width):
    def f(key):
      params = init(key, width)
      # Exact moments: weights N(0, 1), biases N(0, 0.01).
      return params
    return f

  errors = {}
  for width, samples in ((8, 2), (256, 32)):
    mc = iw.monte_carlo_kernel_fn(init_fn(width), mlp, jax.random.PRNGKey(3), samples)
    est = mc(X1, X2, ('nngp', 'ntk'))
    errors[width] = [float(np.abs(e - a).max() / np.abs(a).max())
                     for e, a in zip(est, (analytic.nngp, analytic.ntk))]
  assert errors[256][0] < 0.3 and errors[256][1] < 0.05, errors
  assert errors[256][0] < errors[8][0] and errors[256][1] < errors[8][1], errors


def test_layernorm_with_jnp_var_under_jit():
  # jnp.var divides by a computed width; constants must stay concrete under
  # jit so that the mean over the wide axis is recognised. Oracle: the same
  # network written with explicit means.
  def ln_var(h):
    return (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)

  def ln_means(h):
    m = h.mean(-1, keepdims=True)
    return (h - m) / jnp.sqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5)

  params = init(jax.random.PRNGKey(2), 16)
  kernels = []
  for ln in (ln_var, ln_means):
    f = lambda p, x, ln=ln: jax.nn.relu(ln(x @ p[0][0])) @ p[1][0] / 4.
    kf = jax.jit(iw.kernelize(f, params, param_stats=STATS), static_argnames='get')
    kernels.append(kf(X1, X2, 'ntk'))
  np.testing.assert_allclose(kernels[0], kernels[1], rtol=1e-12)


def test_unnormalised_sum_over_wide_axis_is_reported():
  # A 1/sqrt(n)-scaled sum keeps a Gaussian fluctuation that a deterministic
  # statistic would silently drop: it must be an error.
  params = init(jax.random.PRNGKey(2), 16)
  f = lambda p, x: (jnp.tanh(x @ p[0][0]).sum(-1, keepdims=True) / 4.) * (x @ p[0][0]) @ p[1][0]
  with pytest.raises(iw.UnsupportedPrimitiveError, match='not divided by the width'):
    iw.kernelize(f, params, param_stats=STATS)(X1)
