"""The requirements pass: which values need full spatial blocks, which pixel
diagonals, which only per-input statistics.

The oracle is the structure of each network (what its readout reads), and
for the decision that matters — track pixel diagonals or full blocks — the
kernels themselves: both decisions must give equal kernels where the pass
allows diagonals, and the spy in `test_kernelize_spatial` checks that only
one interpretation runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

from infwidth.interpreters.flat_program import flatten
from infwidth.domain.needs import Need
from infwidth.interpreters.requirements import output_need, requirements
from infwidth.interpreters.walker import trace
from infwidth.interpreters.compat import CALL_PRIMITIVES

X = jnp.ones((2, 6, 6, 3))
DN = ('NHWC', 'HWIO', 'NHWC')


def conv(w, x):
  return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=DN)


def pool(x):
  return lax.reduce_window(x, 0., lax.add, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID') / 4


W1, W2 = jnp.ones((3, 3, 3, 4)), jnp.ones((3, 3, 4, 4))


def _needs_by_primitive(fn, *args):
  """{primitive: [need of each of its outputs]} in program order."""
  closed = trace(fn, *args)
  req = requirements(closed)
  prog = flatten(closed, inline=CALL_PRIMITIVES)
  out = {}
  for op in prog.ops:
    out.setdefault(op.prim, []).append(req.needs.get(op.outs[0]))
  return req, out


def test_output_needs():
  assert output_need((8, 10)) == Need.PIXEL_DIAGONAL
  assert output_need((8, 1, 1, 10)) == Need.PIXEL_DIAGONAL
  assert output_need((8, 5, 5, 10)) == Need.FULL
  assert output_need((8, 7, 10)) == Need.FULL


def test_flatten_readout_needs_only_pixel_diagonals():
  def net(x):
    h = jax.nn.relu(conv(W2, jax.nn.relu(conv(W1, x))))
    return h.reshape(h.shape[0], -1) @ jnp.ones((6 * 6 * 4, 3))
  req, by_prim = _needs_by_primitive(jax.jit(net), X)
  assert req.pixel_diagonal
  assert set(by_prim[P.conv_general_dilated_p]) == {Need.PIXEL_DIAGONAL}
  assert req.full_blocks() == []


def test_values_below_a_pooling_need_full_blocks():
  def net(x):
    h = jax.nn.relu(conv(W1, x))
    h = jax.nn.relu(conv(W2, pool(h)))
    return h.reshape(h.shape[0], -1) @ jnp.ones((3 * 3 * 4, 3))
  req, by_prim = _needs_by_primitive(net, X)
  assert req.pixel_diagonal                      # the output needs no spatial blocks
  first, second = by_prim[P.conv_general_dilated_p]
  assert first == Need.FULL                      # below the pooling
  assert second == Need.PIXEL_DIAGONAL           # after it
  assert set(by_prim[P.max_p]) == {Need.FULL, Need.PIXEL_DIAGONAL}


def test_spatial_output_needs_full_blocks_everywhere():
  req, by_prim = _needs_by_primitive(lambda x: conv(W2, jax.nn.relu(conv(W1, x))), X)
  assert not req.pixel_diagonal
  assert set(by_prim[P.conv_general_dilated_p]) == {Need.FULL}


def test_channel_statistics_need_only_the_batch_diagonal():
  def net(x):
    h = x.reshape(2, -1) @ jnp.ones((108, 16))
    var = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
    return (h / jnp.sqrt(var)) @ jnp.ones((16, 2))
  req, by_prim = _needs_by_primitive(net, X)
  assert by_prim[P.square_p] == [Need.BATCH_DIAGONAL]   # only its channel mean is used
  assert by_prim[P.dot_general_p][0] == Need.PIXEL_DIAGONAL
  assert np.all([n is not None for n in by_prim[P.div_p]])
