"""Integer inputs and embedding lookups: `W[ids]`, `jnp.take`, Flax `nn.Embed`.

A row of an embedding table of i.i.d. entries is a Gaussian source per token:
`Cov(W[t], W[t′]) = σ²·[t = t′]` (a dense layer of the one-hot inputs). Checked
against the arc-cosine closed form of a ReLU layer above it and against Monte
Carlo of the finite network; integer inputs stay integer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw
import mc_check

V, D, W, L = 20, 64, 512, 5
IDS = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(4, L)))
IDS2 = jnp.asarray(np.random.default_rng(1).integers(0, V, size=(3, L)))


def net(p, t):
  h = jax.nn.relu(p['emb'][t] @ p['w'] / np.sqrt(D))    # (N, L, W)
  return h.mean(1) @ p['o'] / np.sqrt(W)


def _shapes():
  return {'emb': (V, D), 'w': (D, W), 'o': (W, 256)}


def _kernel(f, ids, ids2=None, get=('nngp', 'ntk')):
  p = jax.tree.map(jnp.ones, _shapes(), is_leaf=lambda s: isinstance(s, tuple))
  stats = jax.tree.map(lambda _: iw.ParamStats(0., 1.), p)
  return iw.kernelize(f, p, param_stats=stats)(ids, ids2, get)


def _arccos1(rho):
  """E[relu(u) relu(v)] for unit-variance u, v of correlation ρ (Cho & Saul)."""
  return (np.sqrt(1 - rho ** 2) + (np.pi - np.arccos(rho)) * rho) / (2 * np.pi)


def test_embedding_closed_form():
  k = _kernel(net, IDS, IDS2, 'nngp')
  same = (np.asarray(IDS)[:, None, :, None] == np.asarray(IDS2)[None, :, None, :])
  np.testing.assert_allclose(k, _arccos1(same.astype(float)).mean((2, 3)), rtol=1e-10)


def test_embedding_matches_monte_carlo():
  k = _kernel(net, IDS)
  rng = np.random.default_rng(0)
  f = jax.jit(lambda p: (lambda o: o @ o.T / o.shape[1])(net(p, IDS)))
  draws = np.stack([f({n: jnp.asarray(rng.standard_normal(s)) for n, s in _shapes().items()})
                    for _ in range(64)])
  mc_check.check_against_mc(k.nngp, draws, 2, W, 4.0, 2.0)
  # The NTK: every layer's own gradient (NTK parameterisation, Θ_emb = [t = t′]).
  same = (np.asarray(IDS)[:, None, :, None] == np.asarray(IDS)[None, :, None, :]).astype(float)
  step = (np.pi - np.arccos(same)) / (2 * np.pi)   # E[relu′ relu′]
  ntk = _arccos1(same).mean((2, 3)) + (step * (same + same)).mean((2, 3))
  np.testing.assert_allclose(k.ntk, ntk, rtol=1e-10)


class FlaxEmbedMLP(nn.Module):
  @nn.compact
  def __call__(self, t):
    h = nn.Embed(V, D)(t)
    h = jax.nn.relu(nn.Dense(W)(h))
    return nn.Dense(3)(h.mean(1))


def test_flax_embed_equals_plain_jax():
  model = FlaxEmbedMLP()
  variables = model.init(jax.random.PRNGKey(0), IDS)
  p = variables['params']
  plain = lambda q, t: (jax.nn.relu(q['e'][t] @ q['w'] + q['b']).mean(1) @ q['o'] + q['c'])
  q = {'e': p['Embed_0']['embedding'], 'w': p['Dense_0']['kernel'], 'b': p['Dense_0']['bias'],
       'o': p['Dense_1']['kernel'], 'c': p['Dense_1']['bias']}
  stats = lambda tree: jax.tree.map(lambda a: iw.ParamStats(0., 0.5), tree)
  got = iw.kernelize(model.apply, variables, param_stats=stats(variables))(IDS, IDS2)
  want = iw.kernelize(plain, q, param_stats=stats(q))(IDS, IDS2)
  np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-12)
  np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-12)


def test_float32_tables_and_integer_inputs():
  p = {n: jnp.ones(s, jnp.float32) for n, s in _shapes().items()}
  stats = jax.tree.map(lambda _: iw.ParamStats(0., 1.), p)
  k = iw.kernelize(net, p, param_stats=stats)(IDS.astype(jnp.int32), None, 'nngp')
  assert k.dtype == jnp.float32
  np.testing.assert_allclose(k, _kernel(net, IDS, None, 'nngp'), rtol=1e-5)
