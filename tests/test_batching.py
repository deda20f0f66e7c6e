"""Tests of `infwidth.batch` against unbatched kernel functions."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import infwidth as iw
from infwidth.kernel import Kernel, kernel_namedtuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Kernel functions with known closed forms. -----------------------------------

def _as_get(k: Kernel, get):
  return k if get is None else k.get(get)


def erf_kernel_fn(x1, x2=None, get=None, w_std=1.5, b_std=0.1):
  """NNGP/NTK of Dense-erf-Dense on vectors (Williams' arcsine kernel).

  Chosen over the ReLU arc-cosine kernel because it is well conditioned at
  `x1 == x2` (no `arccos` near 1), so tiles and the unbatched call agree to
  rounding and can be compared at `rtol=1e-11`.
  """
  y2 = x1 if x2 is None else x2
  d = x1.shape[-1]
  k12 = w_std**2 * x1 @ y2.T / d + b_std**2
  k11 = w_std**2 * jnp.sum(x1**2, -1) / d + b_std**2
  k22 = w_std**2 * jnp.sum(y2**2, -1) / d + b_std**2
  denom = (1 + 2 * k11)[:, None] * (1 + 2 * k22)[None, :]
  t = 2 / jnp.pi * jnp.arcsin(2 * k12 / jnp.sqrt(denom))
  t_dot = 4 / jnp.pi / jnp.sqrt(denom - 4 * k12**2)
  nngp = w_std**2 * t + b_std**2
  ntk = nngp + w_std**2 * t_dot * k12
  cov = lambda kd: w_std**2 * 2 / jnp.pi * jnp.arcsin(2 * kd / (1 + 2 * kd)) + b_std**2
  k = Kernel(nngp=nngp, ntk=ntk, cov1=cov(k11),
             cov2=None if x2 is None else cov(k22), x1_is_x2=x2 is None,
             shape1=(x1.shape[0], 1), shape2=(y2.shape[0], 1))
  return _as_get(k, get)


_FEATURES = np.random.RandomState(7).randn(4, 3 * 3 * 5)


def _features(x):
  # Fixed feature map: (N, 4) -> (N, H=3, W=3, C=5).
  return jnp.tanh(x @ _FEATURES).reshape(x.shape[0], 3, 3, 5)


def spatial_kernel_fn(x1, x2=None, get=None, diagonal_spatial=False):
  """Kernel `(N1, N2, H, H', W, W')` (or `(N1, N2, H, W)`) of a feature map."""
  f1 = _features(x1)
  f2 = f1 if x2 is None else _features(x2)
  if diagonal_spatial:
    pair = lambda a, b: jnp.einsum('ahwc,bhwc->abhw', a, b) / 5
    diag = lambda a: jnp.einsum('ahwc,ahwc->ahw', a, a) / 5
  else:
    pair = lambda a, b: jnp.einsum('ahwc,bgvc->abhgwv', a, b) / 5
    diag = lambda a: jnp.einsum('ahwc,agvc->ahgwv', a, a) / 5
  nngp = pair(f1, f2)
  k = Kernel(nngp=nngp, ntk=2 * nngp + 1, cov1=diag(f1),
             cov2=None if x2 is None else diag(f2), x1_is_x2=x2 is None,
             shape1=(x1.shape[0], 3, 3, 5), shape2=(f2.shape[0], 3, 3, 5),
             diagonal_spatial=diagonal_spatial)
  return _as_get(k, get)


def pytree_kernel_fn(x1, x2=None, get=None):
  """A kernel on dict inputs `{'a': (N, 3), 'b': (N, 1)}`."""
  cat = lambda x: jnp.concatenate([x['a'], x['b']], -1)
  return erf_kernel_fn(cat(x1), None if x2 is None else cat(x2), get)


def cross_kernel_fn(x1, x2=None, get=None):
  """`(N1, N2, 2, 3)` array whose two batch orders differ (not a mirror)."""
  y2 = x1 if x2 is None else x2
  return jnp.einsum('ap,bq->abpq', x1[:, :2], y2[:, :3])


def _mlp(params, x):
  (w1, b1), (w2, b2) = params
  return jnp.tanh(jnp.tanh(x @ w1 + b1) @ w2 + b2)


def _mlp_params():
  rng = np.random.RandomState(3)
  return ((rng.randn(4, 6) / 2, rng.randn(6) / 10),
          (rng.randn(6, 3) / 3, rng.randn(3) / 10))


def empirical_kernel_fn(x1, x2, get, params, trace_axes=(), diagonal_axes=()):
  """Empirical NNGP/NTK of `_mlp` by Jacobian contraction; logits axis C=3.

  `trace_axes=(-1,)` gives `(N1, N2)`, `diagonal_axes=(-1,)` gives
  `(N1, N2, C)`, neither gives `(N1, N2, C, C)`.
  """
  y2 = x1 if x2 is None else x2
  f1, f2 = _mlp(params, x1), _mlp(params, y2)
  j1 = jax.jacobian(_mlp)(params, x1)
  j2 = jax.jacobian(_mlp)(params, y2)
  flat = lambda j: jnp.concatenate(
      [l.reshape(l.shape[:2] + (-1,)) for l in jax.tree_util.tree_leaves(j)], -1)
  j1, j2 = flat(j1), flat(j2)
  if trace_axes:
    out = {'nngp': f1 @ f2.T / 3, 'ntk': jnp.einsum('acp,bcp->ab', j1, j2) / 3}
  elif diagonal_axes:
    out = {'nngp': jnp.einsum('ac,bc->abc', f1, f2),
           'ntk': jnp.einsum('acp,bcp->abc', j1, j2)}
  else:
    out = {'nngp': jnp.einsum('ac,bd->abcd', f1, f2),
           'ntk': jnp.einsum('acp,bdp->abcd', j1, j2)}
  if isinstance(get, str):
    return out[get]
  return kernel_namedtuple(get)(*(out[g] for g in get))


# Helpers. --------------------------------------------------------------------

def _data(n, d=4, seed=0):
  return np.random.RandomState(seed).randn(n, d)


def assert_same_kernel(batched, unbatched, rtol=1e-11):
  lb, tb = jax.tree_util.tree_flatten(batched)
  lu, tu = jax.tree_util.tree_flatten(unbatched)
  assert tb == tu  # structure, `get` order, static fields (shapes, flags)
  for b, u in zip(lb, lu):
    assert b.shape == u.shape and b.dtype == u.dtype
    np.testing.assert_allclose(np.asarray(b), np.asarray(u), rtol=rtol,
                               atol=rtol * float(np.max(np.abs(u))))


def _x2(which, x, y):
  return {'none': None, 'same': x, 'other': y}[which]


# Equality with the unbatched kernel. ------------------------------------------

@pytest.mark.parametrize('batch_size', [0, 3, 20])
@pytest.mark.parametrize('which_x2', ['none', 'same', 'other'])
@pytest.mark.parametrize('get', [None, 'ntk', ('ntk', 'nngp', 'cov1')])
def test_erf_matches_unbatched(batch_size, which_x2, get):
  x, y = _data(8), _data(5, seed=1)
  x2 = _x2(which_x2, x, y)
  fn = iw.batch(erf_kernel_fn, batch_size, progress=False)
  assert_same_kernel(fn(x, x2, get), erf_kernel_fn(x, x2, get))


def test_erf_kernel_cov2_and_static_fields():
  x, y = _data(8), _data(5, seed=1)
  k = iw.batch(erf_kernel_fn, 3)(x)
  assert k.cov2 is None and k.x1_is_x2 and k.shape1 == (8, 1)
  k = iw.batch(erf_kernel_fn, 3)(x, y)
  assert k.cov2.shape == (5,) and not k.x1_is_x2 and k.shape2 == (5, 1)
  np.testing.assert_allclose(k.cov2, erf_kernel_fn(y).cov1, rtol=1e-12)


@pytest.mark.parametrize('diagonal_spatial', [False, True])
@pytest.mark.parametrize('get', [None, 'nngp', ('nngp', 'ntk')])
@pytest.mark.parametrize('which_x2', ['none', 'other'])
def test_spatial_matches_unbatched(diagonal_spatial, get, which_x2):
  x, y = _data(7), _data(4, seed=1)
  x2 = _x2(which_x2, x, y)
  kw = dict(diagonal_spatial=diagonal_spatial)
  fn = iw.batch(spatial_kernel_fn, 2, progress=False)
  assert_same_kernel(fn(x, x2, get, **kw), spatial_kernel_fn(x, x2, get, **kw))


def test_mirror_swaps_spatial_pairs():
  # A tile below the diagonal must be K(x_j, x_i) with (H, H') swapped.
  x = _data(4)
  k = np.asarray(iw.batch(spatial_kernel_fn, 1)(x, None, 'nngp'))
  np.testing.assert_allclose(k[3, 0], np.transpose(k[0, 3], (1, 0, 3, 2)))
  assert not np.allclose(k[3, 0], k[0, 3])


def test_unknown_layout_computes_lower_tiles():
  x = _data(6)
  fn = iw.batch(cross_kernel_fn, 2)
  assert_same_kernel(fn(x), cross_kernel_fn(x))
  assert_same_kernel(fn(x, x), cross_kernel_fn(x, x))


@pytest.mark.parametrize('axes, which_x2', [
    (dict(), 'none'), (dict(trace_axes=(-1,)), 'other'),
    (dict(diagonal_axes=(-1,)), 'none')])
def test_empirical_matches_unbatched(axes, which_x2):
  x, y = _data(7), _data(5, seed=1)
  x2 = _x2(which_x2, x, y)
  params = _mlp_params()
  fn = iw.batch(empirical_kernel_fn, 3)
  expected_fn = jax.jit(empirical_kernel_fn, static_argnums=2,
                        static_argnames=('trace_axes', 'diagonal_axes'))
  assert_same_kernel(fn(x, x2, 'ntk', params, **axes),
                     expected_fn(x, x2, 'ntk', params, **axes))
  get = ('nngp', 'ntk')
  assert_same_kernel(fn(x, x2, get=get, params=params, **axes),
                     expected_fn(x, x2, get, params, **axes))


def test_infwidth_empirical_kernel_fn():
  empirical = pytest.importorskip('infwidth.empirical')
  kernel_fn = empirical.empirical_kernel_fn(_mlp, trace_axes=())
  x = _data(7)
  params = _mlp_params()
  fn = iw.batch(kernel_fn, 3)
  assert_same_kernel(fn(x, None, ('nngp', 'ntk'), params),
                     kernel_fn(x, None, ('nngp', 'ntk'), params), rtol=1e-10)


def test_pytree_inputs():
  x = {'a': _data(7, 3), 'b': _data(7, 1, seed=2)}
  y = {'a': _data(3, 3, seed=3), 'b': _data(3, 1, seed=4)}
  fn = iw.batch(pytree_kernel_fn, 2)
  assert_same_kernel(fn(x), pytree_kernel_fn(x))
  assert_same_kernel(fn(x, y, 'ntk'), pytree_kernel_fn(x, y, 'ntk'))


def test_float32():
  x = _data(9).astype(np.float32)
  k = iw.batch(erf_kernel_fn, 4)(x, None, 'ntk')
  assert k.dtype == np.float32
  np.testing.assert_allclose(k, erf_kernel_fn(x, None, 'ntk'), rtol=1e-5)


def test_store_on_host():
  x, y = _data(9), _data(5, seed=1)
  fn = iw.batch(spatial_kernel_fn, 4, store_on_device=False)
  k = fn(x, y)
  assert isinstance(k.nngp, np.ndarray) and isinstance(k.cov1, np.ndarray)
  assert_same_kernel(k, spatial_kernel_fn(x, y))
  k = fn(x, None, 'nngp')
  assert isinstance(k, np.ndarray)
  assert_same_kernel(k, spatial_kernel_fn(x, None, 'nngp'))


def test_single_device_sharded_result():
  x = _data(8)
  k = iw.batch(erf_kernel_fn, 3, gather=False)(x)
  assert isinstance(k.nngp, jax.Array) and k.nngp.shape == (8, 8)
  assert_same_kernel(k, erf_kernel_fn(x))


def test_jitted_kernel_fn_and_repeat_calls():
  fn = iw.batch(jax.jit(erf_kernel_fn, static_argnames='get'), 3)
  for seed in range(2):
    x = _data(7, seed=seed)
    assert_same_kernel(fn(x, None, 'nngp'), erf_kernel_fn(x, None, 'nngp'))


# Errors and progress. ---------------------------------------------------------

def test_bad_arguments():
  with pytest.raises(ValueError, match='batch_size'):
    iw.batch(erf_kernel_fn, -1)
  with pytest.raises(ValueError, match='device_count'):
    iw.batch(erf_kernel_fn, 2, device_count=jax.local_device_count() + 1)(
        _data(3))
  fn = iw.batch(pytree_kernel_fn, 2)
  with pytest.raises(ValueError, match='disagree on the batch size'):
    fn({'a': _data(7, 3), 'b': _data(6, 1)})
  with pytest.raises(ValueError, match='leading batch axis'):
    iw.batch(erf_kernel_fn, 2)(np.float64(1.0))
  with pytest.raises(NotImplementedError, match='Kernel input'):
    iw.batch(erf_kernel_fn, 2)(erf_kernel_fn(_data(3)))


def test_progress_reports(capsys):
  x = _data(12)
  iw.batch(erf_kernel_fn, 2, progress=True)(x)
  err = capsys.readouterr().err
  try:
    import tqdm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    assert '21/21' in err
  except ImportError:
    assert '21/21 tiles' in err and 'left' in err and 'elapsed' in err
  iw.batch(erf_kernel_fn, 2, progress=False)(x)
  iw.batch(erf_kernel_fn, 6)(x)  # 3 tiles: quiet by default
  assert capsys.readouterr().err == ''


# Subprocesses: devices, hosts, memory, checkpoints. ---------------------------

_PRELUDE = textwrap.dedent(f'''
    import os, sys
    sys.path.insert(0, {REPO!r})
    sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    import jax
    jax.config.update('jax_enable_x64', True)
    import numpy as np
    import infwidth as iw
    import test_batching
    globals().update(vars(test_batching))
''')


def _run_script(body, env_extra=None, timeout=120, args=()):
  env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
  return subprocess.run([sys.executable, '-c', _PRELUDE + textwrap.dedent(body),
                         *args], env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_four_cpu_devices():
  res = _run_script('''
      assert jax.local_device_count() == 4
      x, y = _data(11), _data(6, seed=1)
      fn = iw.batch(spatial_kernel_fn, 2)
      assert_same_kernel(fn(x), spatial_kernel_fn(x))
      assert_same_kernel(fn(x, y, 'nngp'), spatial_kernel_fn(x, y, 'nngp'))
      k = iw.batch(erf_kernel_fn)(x)  # batch_size 0: row blocks over devices
      assert_same_kernel(k, erf_kernel_fn(x))
      fn = iw.batch(erf_kernel_fn, 3, device_count=2, store_on_device=False)
      assert_same_kernel(fn(x, y), erf_kernel_fn(x, y))
      k = iw.batch(erf_kernel_fn, 3, gather=False)(_data(12))
      assert len(k.nngp.sharding.device_set) == 4
      assert_same_kernel(k, erf_kernel_fn(_data(12)))
      try:
        iw.batch(erf_kernel_fn, 3, gather=False)(x)
        raise AssertionError('N1=11 on 4 devices must be refused')
      except ValueError as e:
        assert 'divisible' in str(e)
      print('OK')
  ''', {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes():
  body = '''
      pid, port = int(sys.argv[1]), sys.argv[2]
      jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                                 process_id=pid, initialization_timeout=60)
      x, y = _data(10), _data(6, seed=1)
      k = iw.batch(spatial_kernel_fn, 3)(x, None, 'nngp')
      assert isinstance(k, jax.Array)
      assert_same_kernel(k, spatial_kernel_fn(x, None, 'nngp'))
      k = iw.batch(erf_kernel_fn, 3, store_on_device=False)(x, y, 'ntk')
      assert isinstance(k, np.ndarray)
      assert_same_kernel(k, erf_kernel_fn(x, y, 'ntk'))
      k = iw.batch(erf_kernel_fn, 3, gather=False)(x)
      assert k.nngp.shape == (10, 10) and len(k.nngp.sharding.device_set) == 2
      rows = {s.index[0].start or 0: np.asarray(s.data)
              for s in k.nngp.addressable_shards}
      full = np.asarray(erf_kernel_fn(x).nngp)
      for r0, block in rows.items():
        np.testing.assert_allclose(block, full[r0:r0 + 5], rtol=1e-12)
      assert sorted(rows) == [5 * pid]
      print('OK', pid)
      jax.distributed.shutdown()
  '''
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='')
  procs = [subprocess.Popen(
      [sys.executable, '-c', _PRELUDE + textwrap.dedent(body), str(p),
       str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for p in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=150))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0 and 'OK' in out, err[-3000:]


def test_memory_below_unbatched():
  # A kernel with an (N1, N2, F) intermediate that XLA must materialise for
  # the sort: 500*500*80 doubles = 160 MB unbatched, 6 MB per 100x100 tile.
  body = '''
      import jax.numpy as jnp
      def big_fn(x1, x2=None, get=None):
        y2 = x1 if x2 is None else x2
        return jnp.sort(x1[:, None, :] * y2[None, :, :], -1)[..., -1]
      x = _data(500, 80)
      bs = int(sys.argv[1])
      k1 = np.asarray(iw.batch(big_fn, bs)(x))
      k2 = iw.batch(big_fn, bs, store_on_device=False)(x) if bs else k1
      # VmHWM: peak resident memory of this process image, in kB.
      hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]
      print('RSS', hwm[0].split()[1])
      print('SUM', float(k1.sum()), float(k2.sum()))
  '''
  env = dict(os.environ, PYTHONPATH=REPO)
  procs = {bs: subprocess.Popen(
      [sys.executable, '-c', _PRELUDE + textwrap.dedent(body), str(bs)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for bs in (0, 100)}
  rss, sums = {}, {}
  for bs, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = {l.split()[0]: l.split()[1:] for l in out.splitlines()}
    rss[bs], sums[bs] = int(lines['RSS'][0]), [float(v) for v in lines['SUM']]
  np.testing.assert_allclose(sums[100], [sums[0][0]] * 2, rtol=1e-12)
  # kB: both batched runs (device and host storage) peak far lower.
  assert rss[100] < rss[0] - 60_000, rss


_COUNTING = textwrap.dedent('''
    import functools, time
    from jax.experimental import io_callback
    COUNTER = os.environ['COUNTER']
    def _tick():
      with open(COUNTER, 'a') as f:
        f.write('x')
      time.sleep(float(os.environ.get('TILE_SLEEP', '0')))
    def counting_fn(x1, x2=None, get=None, w_std=1.5):
      io_callback(_tick, None, ordered=True)
      return erf_kernel_fn(x1, x2, get, w_std=w_std)
''')


def _count(path):
  return len(open(path).read()) if os.path.exists(path) else 0


def test_checkpoint_resume_after_kill(tmp_path):
  ckpt, counter = str(tmp_path / 'ckpt'), str(tmp_path / 'count')
  env = dict(os.environ, PYTHONPATH=REPO, COUNTER=counter, TILE_SLEEP='0.25',
             XLA_FLAGS='')
  body = _COUNTING + textwrap.dedent(f'''
      x = _data(12)
      iw.batch(counting_fn, 2, device_count=0, checkpoint_dir={ckpt!r})(x)
      print('FINISHED')
  ''')
  proc = subprocess.Popen([sys.executable, '-c', _PRELUDE + textwrap.dedent(body)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 90
  sidecars = lambda: [f for f in os.listdir(ckpt) if f.endswith('.json')
                      and f != 'manifest.json'] if os.path.isdir(ckpt) else []
  while len(sidecars()) < 5 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  done = len(sidecars())
  assert 5 <= done < 21, done  # killed midway: 21 tiles in the triangle
  os.remove(counter)
  res = _run_script(_COUNTING + textwrap.dedent(f'''
      x = _data(12)
      k = iw.batch(counting_fn, 2, device_count=0, checkpoint_dir={ckpt!r})(x)
      assert_same_kernel(k, erf_kernel_fn(x))
      print('OK')
  '''), {'COUNTER': counter, 'XLA_FLAGS': ''})
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]
  assert _count(counter) == 21 - done


def test_checkpoint_refuses_other_inputs_and_recomputes_corrupt(tmp_path):
  ckpt, counter = str(tmp_path / 'ckpt'), str(tmp_path / 'count')
  res = _run_script(_COUNTING + textwrap.dedent(f'''
      import warnings
      x = _data(9)
      fn = iw.batch(counting_fn, 3, device_count=0, checkpoint_dir={ckpt!r})
      assert_same_kernel(fn(x), erf_kernel_fn(x))
      assert open(COUNTER).read() == 'x' * 6
      assert_same_kernel(fn(x), erf_kernel_fn(x))  # all tiles from disk
      assert open(COUNTER).read() == 'x' * 6
      for bad in (lambda: fn(_data(9, seed=5)),          # other inputs
                  lambda: fn(x, None, 'ntk'),            # other get
                  lambda: iw.batch(erf_kernel_fn, 3,    # other kernel_fn
                                   checkpoint_dir={ckpt!r})(x),
                  lambda: iw.batch(functools.partial(counting_fn, w_std=2.),
                                   3, checkpoint_dir={ckpt!r})(x),
                  lambda: iw.batch(counting_fn, 2,       # other batch_size
                                   checkpoint_dir={ckpt!r})(x)):
        try:
          bad()
          raise AssertionError('must be refused')
        except ValueError as e:
          assert 'different computation' in str(e), e
      # Truncate one tile, flip a byte in another: both recomputed.
      path = os.path.join({ckpt!r}, 'tile_0_1_leaf0.npy')
      data = open(path, 'rb').read()
      open(path, 'wb').write(data[:len(data) // 2])
      path = os.path.join({ckpt!r}, 'tile_1_2_leaf1.npy')
      data = bytearray(open(path, 'rb').read())
      data[-1] ^= 1
      open(path, 'wb').write(bytes(data))
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert_same_kernel(fn(x), erf_kernel_fn(x))
      assert sum('corrupt' in str(m.message) for m in w) == 2
      assert open(COUNTER).read() == 'x' * 8
      print('OK')
  '''), {'COUNTER': counter, 'XLA_FLAGS': ''})
  assert res.returncode == 0 and 'OK' in res.stdout, res.stderr[-3000:]


def test_batch_under_jit_gives_the_same_values():
  from infwidth import stax
  _, _, kernel_fn = stax.serial(stax.Dense(16), stax.Relu(), stax.Dense(2))
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5))
  batched = iw.batch(kernel_fn, batch_size=4)
  for x2 in (None, x[:3]):
    want = batched(x, x2, ('nngp', 'ntk'))
    got = jax.jit(batched, static_argnums=2)(x, x2, ('nngp', 'ntk'))
    np.testing.assert_allclose(got.nngp, want.nngp, rtol=1e-6)
    np.testing.assert_allclose(got.ntk, want.ntk, rtol=1e-6)


def test_checkpoint_of_a_stax_kernel_fn_resumes_in_the_same_process(tmp_path):
  # The first call of a fresh stax kernel_fn looks its parameter shapes up for
  # the first time; the checkpoint's fingerprint of it must not depend on that.
  from infwidth import stax
  _, _, kernel_fn = stax.serial(stax.Dense(16), stax.Relu(), stax.Dense(1))
  x = _data(6)
  batched = iw.batch(kernel_fn, 2, device_count=0, checkpoint_dir=str(tmp_path))
  k = batched(x, None, 'nngp')
  np.testing.assert_array_equal(batched(x, None, 'nngp'), k)  # from disk
  traced = lambda: str(jax.make_jaxpr(lambda a: kernel_fn(a, None, 'nngp'))(x[:1]))
  _, _, kernel_fn = stax.serial(stax.Dense(16), stax.Relu(), stax.Dense(1))
  assert traced() == traced()
