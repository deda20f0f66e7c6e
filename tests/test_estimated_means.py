"""Estimated parameter means: a sample mean within 3 standard errors of 0 is
taken as 0 (its second moment kept), so sampled centred parameters keep the
closed-form (arc-cosine) path; a significant mean is kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth.domain.params import centred_if_insignificant
from test_noncentred_rectifiers import quadrature_calls

pytestmark = pytest.mark.filterwarnings('ignore:parameter moments estimated')


def mlp(p, x):
  for i, (w, b) in enumerate(p):
    x = x @ w / np.sqrt(w.shape[0]) + 0.1 * b
    if i < len(p) - 1:
      x = jax.nn.relu(x)
  return x


def _params(bias_mean=0.0, seed=0):
  rng = np.random.default_rng(seed)
  dims = [20, 256, 256, 4]
  return [(jnp.asarray(rng.standard_normal((a, b))), jnp.asarray(bias_mean + rng.standard_normal(b)))
          for a, b in zip(dims[:-1], dims[1:])]


X = jax.random.normal(jax.random.PRNGKey(0), (6, 20))


def test_sampled_centred_parameters_take_the_closed_form_path(monkeypatch):
  params = _params()
  sampled = iw.kernelize(mlp, params)
  # The same kernel as with the sample's second moments given exactly.
  stats = jax.tree.map(lambda a: iw.ParamStats(0.0, float(jnp.mean(a ** 2))), params)
  exact = iw.kernelize(mlp, params, param_stats=stats)
  k, want = sampled(X, None, ('nngp', 'ntk')), exact(X, None, ('nngp', 'ntk'))
  np.testing.assert_allclose(k.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(k.ntk, want.ntk, rtol=1e-12)
  # The (centred) closed forms: no quadrature is traced.
  calls = quadrature_calls(monkeypatch)
  iw.kernelize(mlp, params)(X, None, ('nngp', 'ntk'))
  assert not calls


def test_significant_means_are_kept():
  params = _params(bias_mean=2.0)
  k = iw.kernelize(mlp, params)(X, None, 'nngp')  # bias means ~2: 30 standard errors
  # Weights: their (insignificant) means are taken as 0; biases keep theirs.
  stats = [(iw.ParamStats(0.0, float(jnp.mean(w ** 2))),
            iw.ParamStats(float(jnp.mean(b)), float(jnp.var(b)))) for w, b in params]
  want = iw.kernelize(mlp, params, param_stats=stats)(X, None, 'nngp')
  np.testing.assert_allclose(k, want, rtol=1e-10)


@pytest.mark.parametrize('mean,var,size,want', [
    (0.05, 1.0, 100, (0.0, 1.0025)),      # 0.5 SE
    (0.29, 1.0, 100, (0.0, 1.0841)),      # 2.9 SE
    (0.31, 1.0, 100, (0.31, 1.0)),        # 3.1 SE
    (-2.0, 1.0, 512, (-2.0, 1.0)),
])
def test_the_three_standard_error_rule(mean, var, size, want):
  np.testing.assert_allclose(centred_if_insignificant(mean, var, size), want)
