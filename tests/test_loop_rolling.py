"""Rolling repeated blocks of a jaxpr into scans changes the program, never its values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth.interpreters import loop_rolling as LR

jax.config.update('jax_enable_x64', True)


def _check(fn, *args, loops):
  closed = jax.make_jaxpr(fn)(*args)
  plan = LR.plan_loops(closed.jaxpr)
  assert [(l.block, l.repeats) for l in plan] == loops
  want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args)
  got = LR.eval_rolled(closed, *args)
  for w, g in zip(want, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-13, atol=0)
  jitted = jax.jit(lambda *a: LR.eval_rolled(closed, *a))
  assert 'scan' in str(jax.make_jaxpr(jitted)(*args)) or not loops
  return plan


def _x():
  return jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)))


def test_identical_layers_become_one_scan():
  w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5))) / 3

  def f(x):
    for _ in range(6):
      x = 1.5 * jnp.tanh(x @ w + 0.1)
    return x.sum()
  _check(f, _x(), loops=[(4, 6)])


def test_layers_with_different_constants_scan_over_them():
  # Per-layer scales are literals that differ: they become scanned inputs.
  def f(x):
    acc = jnp.zeros_like(x)
    for i in range(5):
      x = jnp.sin(x * (0.5 + i)) + 1.0
      acc = acc + x
    return acc
  plan = _check(f, _x(), loops=[(4, 5)])
  assert plan[0].xs_refs


def test_values_of_earlier_layers_read_after_the_loop():
  # Every layer's output is read at the end: stacked scan outputs.
  def f(x):
    outs = []
    for _ in range(4):
      x = jnp.cos(x) * 2.0 + x - 0.5
      outs.append(x)
    return jnp.stack(outs)
  plan = _check(f, _x(), loops=[(4, 4)])
  assert plan[0].ys


def test_reads_two_blocks_back_stay_unrolled():
  # x_{k+1} = f(x_k) + x_{k-1}: a block reading two blocks back is not a
  # scan of this block (values stay right either way).
  def f(x):
    prev, cur = x, jnp.sin(x)
    for _ in range(5):
      prev, cur = cur, jnp.sin(cur) * 0.5 + prev
    return cur
  closed = jax.make_jaxpr(f)(_x())
  got = LR.eval_rolled(closed, _x())[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(f(_x())), rtol=1e-14)


def test_no_repetition_is_plain_evaluation():
  def f(x):
    return jnp.exp(jnp.sin(x) @ x.T).sum(0)
  _check(f, _x(), loops=[])


def _cnn(depth):
  def net(params, x):
    for w, b in params['convs']:
      x = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      x = jax.nn.relu(1.4 / np.sqrt(w.shape[0] * w.shape[1] * w.shape[2]) * x + 0.1 * b)
    x = x.mean((1, 2))
    w, b = params['dense']
    return 1.4 / np.sqrt(w.shape[0]) * (x @ w) + 0.1 * b
  f = jnp.float64
  convs = [(jax.ShapeDtypeStruct((3, 3, 2 if i == 0 else 8, 8), f),
            jax.ShapeDtypeStruct((8,), f)) for i in range(depth)]
  params = dict(convs=convs, dense=(jax.ShapeDtypeStruct((8, 4), f),
                                    jax.ShapeDtypeStruct((4,), f)))
  stats = jax.tree_util.tree_map(lambda _: iw.ParamStats(0., 1.), params)
  return iw.kernelize(net, params, param_stats=stats)


def test_deep_cnn_kernel_is_a_scan_and_equals_its_unrolled_evaluation():
  # The kernels' values are checked against NT and Monte Carlo elsewhere (the
  # deep CNN tests run through scans too); here the oracle is the same traced
  # computation evaluated without rolling.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5, 5, 2)))
  kernel_fn = _cnn(6)
  jaxpr = str(jax.make_jaxpr(lambda x: kernel_fn(x, get=('nngp', 'ntk')))(x))
  assert 'scan' in jaxpr
  k = kernel_fn(x, get=('nngp', 'ntk'))
  rolled = LR.MIN_REPEATS
  try:
    LR.MIN_REPEATS = 10 ** 6   # nothing is rolled
    k_unrolled = kernel_fn(x, get=('nngp', 'ntk'))
  finally:
    LR.MIN_REPEATS = rolled
  np.testing.assert_allclose(k.nngp, k_unrolled.nngp, rtol=1e-13)
  np.testing.assert_allclose(k.ntk, k_unrolled.ntk, rtol=1e-13)
  g = jax.grad(lambda x: kernel_fn(x, x * 1.01, 'ntk').sum())(x)
  assert np.all(np.isfinite(g))
