"""Monte Carlo kernels converge to the closed-form arc-cosine kernels.

The NT paper's Figure 2 experiment, made small: a one-hidden-layer ReLU
network in NTK parameterisation,
`f(x) = σ_w/√n · relu(σ_w/√d · x W1 + σ_b b1) W2 + σ_b b2`, all entries
N(0, 1), has (Cho & Saul; NT Table 1)

  K1 = σ_w² x·x'/d + σ_b²,
  NNGP = σ_w²/(2π) √(K1(x,x) K1(x',x')) (sin θ + (π − θ) cos θ) + σ_b²,
  NTK = NNGP + σ_w² (π − θ)/(2π) · K1,

with cos θ = K1(x,x') / √(K1(x,x) K1(x',x')). For one hidden layer the
empirical kernels are unbiased at any width, so the Monte Carlo error is
pure sampling error, of standard error `std / √S`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw

SW, SB, D, C = 1.5, 0.3, 3, 16


def exact_kernels(x1, x2):
  k12 = SW ** 2 * x1 @ x2.T / D + SB ** 2
  k11 = SW ** 2 * np.sum(x1 ** 2, 1) / D + SB ** 2
  k22 = SW ** 2 * np.sum(x2 ** 2, 1) / D + SB ** 2
  norms = np.sqrt(np.outer(k11, k22))
  theta = np.arccos(np.clip(k12 / norms, -1, 1))
  nngp = SW ** 2 / (2 * np.pi) * norms * (
      np.sin(theta) + (np.pi - theta) * np.cos(theta)) + SB ** 2
  ntk = nngp + SW ** 2 * (np.pi - theta) / (2 * np.pi) * k12
  return nngp, ntk


def network(width):
  def init_fn(key):
    k = jax.random.split(key, 4)
    return dict(w1=jax.random.normal(k[0], (D, width)),
                b1=jax.random.normal(k[1], (width,)),
                w2=jax.random.normal(k[2], (width, C)),
                b2=jax.random.normal(k[3], (C,)))

  def apply_fn(p, x):
    h = jax.nn.relu(SW / np.sqrt(D) * x @ p['w1'] + SB * p['b1'])
    return SW / np.sqrt(width) * h @ p['w2'] + SB * p['b2']
  return init_fn, apply_fn


def inputs():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  return jax.random.normal(k1, (4, D)), jax.random.normal(k2, (3, D))


def per_sample_kernels(init_fn, apply_fn, key, n, x1, x2):
  """The kernels of the individual draws that Monte Carlo averages (same keys
  as NT: `key, split = split(key)`, then `init_key, _ = split(split)`)."""
  splits = []
  for _ in range(n):
    key, s = jax.random.split(key)
    splits.append(jax.random.split(s)[0])
  kernel_fn = iw.empirical_kernel_fn(apply_fn, implementation=1)
  one = jax.jit(lambda k: kernel_fn(x1, x2, ('nngp', 'ntk'), init_fn(k)))
  return jax.lax.map(one, jnp.stack(splits))


def rel_err(a, b):
  return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_monte_carlo_converges_to_arc_cosine_kernels():
  x1, x2 = inputs()
  exact = exact_kernels(np.asarray(x1), np.asarray(x2))
  key = jax.random.PRNGKey(1)
  errs = {}
  for width, n in ((16, 4), (256, 128)):
    init_fn, apply_fn = network(width)
    mc = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, n,
                                  implementation=3)(x1, x2, ('nngp', 'ntk'))
    samples = per_sample_kernels(init_fn, apply_fn, key, n, x1, x2)
    for name, want, s in zip(('nngp', 'ntk'), exact, samples):
      got = getattr(mc, name)
      # The estimate is the mean of the draws it says it uses ...
      np.testing.assert_allclose(got, s.mean(0), rtol=1e-10)
      errs[width, name] = rel_err(got, want)
      if n >= 64:  # ... and within 5 standard errors of the closed form.
        se = np.asarray(s.std(0, ddof=1)) / np.sqrt(n)
        assert np.all(np.abs(np.asarray(got) - want) < 5 * se), name
        assert errs[width, name] < 5 * np.linalg.norm(se) / np.linalg.norm(
            want), name
  # The NNGP of one draw is a GP sample: only outputs × samples average it.
  # The NTK also concentrates with width.
  assert errs[256, 'nngp'] < errs[16, 'nngp'] / 2, errs
  assert errs[256, 'ntk'] < errs[16, 'ntk'] / 3, errs


def test_n_samples_list_yields_running_estimates():
  x1, x2 = inputs()
  init_fn, apply_fn = network(128)
  key = jax.random.PRNGKey(2)
  gen = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, [1, 8, 32],
                                 vmap_axes=0)(x1, x2, 'ntk')
  estimates = list(gen)
  assert len(estimates) == 3
  single = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, 32)(x1, x2, 'ntk')
  np.testing.assert_allclose(estimates[-1], single, rtol=1e-10)
  exact = exact_kernels(np.asarray(x1), np.asarray(x2))[1]
  assert rel_err(estimates[-1], exact) < rel_err(estimates[0], exact)


def test_nt_init_convention_batching_and_host_storage():
  x1, x2 = inputs()
  init_fn, apply_fn = network(32)
  nt_init = lambda key, input_shape: ((input_shape[0], C), init_fn(key))
  key = jax.random.PRNGKey(3)
  want = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3)(x1, x1, None)
  got = iw.monte_carlo_kernel_fn(nt_init, apply_fn, key, 3, batch_size=2,
                                 store_on_device=False)(x1, x1, None)
  assert isinstance(got.ntk, np.ndarray)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-10)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-10)
  with pytest.raises(ValueError, match='only 1 local devices'):
    iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3, device_count=2)
  with pytest.raises(ValueError):
    iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, 3, batch_size=3)(
        x1, x2, 'nngp')


def test_rng_reaches_apply_fn():
  """Like NT, an `apply_fn` taking `rng` gets a fresh key per sample."""
  x1, _ = inputs()
  init_fn, apply_fn = network(32)
  seen = []

  def dropout_apply(p, x, rng=None):
    seen.append(rng is not None)
    keep = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1))
    return apply_fn(p, x) * keep
  k = iw.monte_carlo_kernel_fn(init_fn, dropout_apply, jax.random.PRNGKey(4),
                               2)(x1, None, 'nngp')
  assert all(seen) and seen
  assert np.isfinite(np.asarray(k)).all()


def test_samples_spread_over_four_devices():
  """Each device draws whole networks; the estimate equals the one-device one."""
  import os
  import subprocess
  import sys
  import textwrap
  here = os.path.dirname(os.path.abspath(__file__))
  script = textwrap.dedent(f'''
      import sys
      sys.path.insert(0, {here!r})
      import jax
      jax.config.update('jax_enable_x64', True)
      import numpy as np
      import infwidth as iw
      from test_empirical_monte_carlo import inputs, network
      assert jax.local_device_count() == 4
      x1, x2 = inputs()
      init_fn, apply_fn = network(32)
      key = jax.random.PRNGKey(3)
      one = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, [3, 7], device_count=1)
      four = iw.monte_carlo_kernel_fn(init_fn, apply_fn, key, [3, 7], device_count=-1)
      for a, b in zip(one(x1, x2, ('nngp', 'ntk')), four(x1, x2, ('nngp', 'ntk'))):
        np.testing.assert_allclose(b.nngp, a.nngp, rtol=1e-10)
        np.testing.assert_allclose(b.ntk, a.ntk, rtol=1e-10)
      print('OK')
  ''')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=os.path.dirname(here))
  res = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]
