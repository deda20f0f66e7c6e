"""Arrays computed jointly in one fused loop: the same values, derivatives and batching."""

import jax
import jax.numpy as jnp
import numpy as np

from infwidth.domain.joint_outputs import joint

jax.config.update('jax_enable_x64', True)


def _two_recursions(x):
  """An NNGP-like and an NTK-like recursion sharing every elementwise step."""
  k = x @ x.T
  v = jnp.sum(x * x, axis=1)
  t = k
  for _ in range(3):
    rho = k / jnp.sqrt(v[:, None] * v[None, :])
    k = jnp.cos(rho) + rho * jnp.exp(rho)
    t = k + t * jnp.sin(rho)
    v = v / 2 + 1
  return k, t


def _x(n=6):
  return jnp.asarray(np.random.default_rng(0).normal(size=(n, 4)))


def test_joint_returns_its_inputs_exactly():
  x = _x()
  want = _two_recursions(x)
  got = jax.jit(lambda a: joint(_two_recursions(a)))(x)
  for w, g in zip(want, got):      # (eager and fused arithmetic round differently)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-14)
  signed = jnp.asarray([-0.0, 0.0, -1.5, np.inf, -np.inf, np.nan])
  out = joint((signed, 2 * signed))
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(signed))


def test_joint_keeps_derivatives_and_batching():
  x = _x()
  loss = lambda f: (lambda a: sum(jnp.sum(o ** 2) for o in f(a)))
  g_want = jax.grad(loss(_two_recursions))(x)
  g_got = jax.jit(jax.grad(loss(lambda a: joint(_two_recursions(a)))))(x)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-13)
  xs = jnp.stack([x, 2 * x])
  batched = jax.vmap(lambda a: joint(_two_recursions(a)))(xs)
  for i in range(2):
    for w, g in zip(_two_recursions(xs[i]), batched):
      np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), rtol=1e-14)


def test_shared_work_is_one_fused_loop():
  # Two outputs sharing a recursion: XLA:CPU materialises the shared
  # intermediates in several (N, N) loops; computed jointly, one loop.
  x = _x(64)

  def square_loops(fn):
    text = jax.jit(fn).lower(x).compile().as_text()
    return sum(1 for line in text.split('ENTRY')[1].splitlines()
               if ' = ' in line and 'f64[64,64]' in line.split(' = ')[1][:40]
               and 'kind=kLoop' in line)
  assert square_loops(lambda a: joint(_two_recursions(a))) == 1
  assert square_loops(_two_recursions) > 1



def _mlp_kernel_fn():
  import infwidth as iw

  def mlp(params, x):
    for w in params[:-1]:
      x = jax.nn.relu(x @ w / np.sqrt(w.shape[0]))
    return x @ params[-1] / np.sqrt(params[-1].shape[0])
  params = [jax.ShapeDtypeStruct(s, jnp.float64) for s in ((4, 8), (8, 8), (8, 1))]
  return iw.kernelize(mlp, params, param_stats=[iw.ParamStats(0., 1.)] * 3)


def test_kernelize_computes_nngp_and_ntk_jointly_only_when_both_are_asked_for():
  kf, x = _mlp_kernel_fn(), _x(64)

  def joint_loops(get):
    text = jax.jit(lambda a: kf(a, None, get)).lower(x).compile().as_text()
    return sum(1 for line in text.split('ENTRY')[1].splitlines()
               if '(f64[64,64]{1,0}, f64[64,64]{1,0}) fusion(' in line)
  assert joint_loops(('nngp', 'ntk')) == 1
  assert joint_loops(None) == 1
  assert joint_loops('nngp') == 0        # the NTK recursion is not computed
  k = jax.jit(lambda a: kf(a, None, ('nngp', 'ntk')))(x)
  want = kf(x, None, ('nngp', 'ntk'))    # eager: no joint loop
  np.testing.assert_allclose(np.asarray(k.nngp), np.asarray(want.nngp), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(k.ntk), np.asarray(want.ntk), rtol=1e-12)
