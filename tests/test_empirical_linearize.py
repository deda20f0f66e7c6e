"""linearize and taylor_expand against independent oracles, and training."""

import jax
import jax.numpy as jnp
import numpy as np

import infwidth as iw


def mlp(width=8, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = dict(w1=jax.random.normal(k[0], (3, width)),
                b1=jax.random.normal(k[1], (width,)),
                w2=jax.random.normal(k[2], (width, 2)))

  def f(p, x, scale=1.):
    h = jnp.tanh(x @ p['w1'] / np.sqrt(3) + 0.1 * p['b1'])
    return scale * h @ p['w2'] / np.sqrt(width)
  return f, params, jax.random.normal(k[3], (5, 3))


def perturb(params, eps, seed=1):
  leaves, tree = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + eps * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, ks)])


def test_linearize_is_first_order_taylor():
  f, p0, x = mlp()
  p = perturb(p0, 0.3)
  jac = jax.jacobian(f)(p0, x)
  lin = np.asarray(f(p0, x)) + sum(
      np.einsum('ncp,p->nc', np.reshape(j, (5, 2, -1)),
                np.ravel(p[k] - p0[k])) for k, j in jac.items())
  f_lin = iw.linearize(f, p0)
  np.testing.assert_allclose(f_lin(p, x), lin, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(f_lin(p0, x), f(p0, x), rtol=1e-14)
  # Keyword arguments pass through; the map is affine in the parameters.
  np.testing.assert_allclose(f_lin(p, x, scale=2.), 2 * lin, rtol=1e-12)
  mid = jax.tree.map(lambda a, b: (a + b) / 2, p, p0)
  np.testing.assert_allclose(f_lin(mid, x), (lin + f(p0, x)) / 2, rtol=1e-12)


def test_taylor_expand_degree_two_matches_nested_jvp():
  f, p0, x = mlp()
  p = perturb(p0, 0.2)
  dp = jax.tree.map(lambda a, b: a - b, p, p0)
  g = lambda q: f(q, x)
  first = jax.jvp(g, (p0,), (dp,))[1]
  second = jax.jvp(lambda q: jax.jvp(g, (q,), (dp,))[1], (p0,), (dp,))[1]
  want = f(p0, x) + first + second / 2
  np.testing.assert_allclose(iw.taylor_expand(f, p0, 2)(p, x), want,
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(iw.taylor_expand(f, p0, 1)(p, x),
                             iw.linearize(f, p0)(p, x), rtol=1e-12)
  np.testing.assert_allclose(iw.taylor_expand(f, p0, 0)(p, x), f(p0, x))
  # Near p0 the error of degree d falls like |dp|^(d+1).
  near = perturb(p0, 0.02)
  errs = [float(jnp.abs(iw.taylor_expand(f, p0, d)(near, x) - f(near, x)).max())
          for d in (1, 2, 3)]
  assert errs[2] < errs[1] / 5 < errs[0] / 25


def test_wide_network_trains_like_its_linearization():
  f, p0, x = mlp(width=1024, seed=2)
  y = jnp.sin(x[:, :2])
  f_lin = iw.linearize(f, p0)
  loss = lambda fn: jax.jit(jax.grad(
      lambda p: 0.5 * jnp.sum((fn(p, x) - y) ** 2)))
  grad, grad_lin = loss(f), loss(f_lin)
  p, q = p0, p0
  lr = 0.5
  for _ in range(20):
    p = jax.tree.map(lambda a, g: a - lr * g, p, grad(p))
    q = jax.tree.map(lambda a, g: a - lr * g, q, grad_lin(q))
  moved = float(jnp.abs(f(p, x) - f(p0, x)).max())
  gap = float(jnp.abs(f(p, x) - f_lin(q, x)).max())
  assert moved > 0.1          # training changed the function ...
  assert gap < 0.02 * moved   # ... and the linearization followed it.
