"""Empirical kernels against Neural Tangents 0.6.5 (tests/fixtures/empirical_nt.npz).

The fixture holds a stax MLP and a stax CNN in NT's NTK parameterisation: their
inputs, parameters (in tree order), outputs, and NT's empirical NNGP and NTK
(implementations 1 and 2, `trace_axes=(-1,)` and `()`). Here the same networks
are rebuilt in plain JAX from the stored parameters.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy.special import erf

import infwidth as iw

FIXTURE = np.load(os.path.join(os.path.dirname(__file__), 'fixtures',
                               'empirical_nt.npz'))


def dense(x, w, b, w_std, b_std):
  return w_std / np.sqrt(x.shape[-1]) * x @ w + (0. if b is None else b_std * b)


def conv(x, w, padding, w_std):
  fan_in = x.shape[-1] * w.shape[0] * w.shape[1]
  return w_std / np.sqrt(fan_in) * lax.conv_general_dilated(
      x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def mlp(p, x):
  w0, b0, w1, b1, w2, b2 = p
  h = jax.nn.relu(dense(x, w0, b0, 1.5, 0.1))
  h = erf(dense(h, w1, b1, 1.5, 0.1))
  return dense(h, w2, b2, 1.2, 0.2)


def cnn(p, x):
  c0, c1, cb1, w, b = p
  h = jax.nn.relu(conv(x, c0, 'SAME', 1.4))
  h = jax.nn.relu(conv(h, c1, 'VALID', 1.3) + 0.1 * cb1)
  h = lax.reduce_window(h, 0., lax.add, (1, 2, 2, 1), (1, 2, 2, 1),
                        'VALID') / 4.
  return dense(h.reshape(h.shape[0], -1), w, b, 1.1, 0.3)


MODELS = dict(mlp=mlp, cnn=cnn)


def load(name):
  n = int(FIXTURE[f'{name}/n_params'])
  params = [jnp.asarray(FIXTURE[f'{name}/param{i}']) for i in range(n)]
  return (MODELS[name], params, jnp.asarray(FIXTURE[f'{name}/x1']),
          jnp.asarray(FIXTURE[f'{name}/x2']))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_rebuilt_network_matches_nt_outputs(name):
  f, params, x1, _ = load(name)
  np.testing.assert_allclose(f(params, x1), FIXTURE[f'{name}/fx1'],
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('tag,trace_axes', [('trace', (-1,)), ('full', ())])
def test_kernels_match_nt(name, tag, trace_axes):
  f, params, x1, x2 = load(name)
  nngp = iw.empirical_nngp_fn(f, trace_axes=trace_axes)(x1, x2, params)
  np.testing.assert_allclose(nngp, FIXTURE[f'{name}/nngp_{tag}'], rtol=1e-10,
                             atol=1e-12)
  wants = [FIXTURE[f'{name}/ntk{nt_impl}_{tag}'] for nt_impl in (1, 2)]
  for impl in iw.NtkImplementation:
    ntk_fn = jax.jit(iw.empirical_ntk_fn(
        f, trace_axes=trace_axes, vmap_axes=0 if impl % 2 else None,
        implementation=impl))
    got = ntk_fn(x1, x2, params)
    for want in wants:  # NT's Jacobian contraction and NTK-vector products
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, rtol=1e-10,
                                 atol=1e-10 * np.abs(want).max())
