"""Blockwise, multi-device and multi-host kernel computation.

`batch(kernel_fn, batch_size)` returns a kernel function with the same
signature that splits `x1 × x2` into tiles of `batch_size × batch_size`
examples, runs the tiles on all local devices at once (`jax.shard_map` over a
one-axis `Mesh`), and writes each finished tile into a preallocated result, on
device or in host memory. The result equals the unbatched kernel: same
structure, shapes and values; ragged sizes are padded by repeating an example
and cropped afterwards.

When `x2` is None (or is `x1`) only tiles on and above the diagonal are
computed, and those below are their mirror images. Mirroring swaps the two
batch axes (a kernel is symmetric: an `(N1, N2)` output is transposed), and
for extra per-example axes assumes:

* a `Kernel` knows its layout: with `diagonal_spatial` every spatial axis
  appears once, `(N1, N2, H, W)`, and stays in place; otherwise axes come in
  pairs, `(N1, N2, H, H', W, W')`, and each pair is swapped too;
* for a bare array or a namedtuple field with extra axes, both layouts are
  tried on a two-example probe `kernel_fn(x[:2], x[:2])`; the one that maps
  the probe onto itself is used. If neither or both do, the tiles below the
  diagonal are computed instead of mirrored.

Under `jax.distributed.initialize()` every process computes a share of the
tiles on its own devices and the tiles are exchanged with
`multihost_utils.process_allgather`, so that the result is either complete on
every host (`gather=True`) or a globally sharded `jax.Array` split along `N1`
over all devices (`gather=False`).

Limitations: `kernel_fn` must be traceable by `jax.jit` and each entry must
depend only on its own pair of examples (no statistics over the batch); a
`Kernel` in place of `x1` (composition) is not batched; with several
processes every tile reaches every host (with `gather=False` a host keeps
only its rows), and a sharded result is assembled in host memory first;
inputs must be complete on every host (not globally sharded arrays).
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infwidth.batching import tiles as bio
from infwidth.kernel import Kernel

_ROW_FIELDS = ('cov1', 'mask1')
_COL_FIELDS = ('cov2', 'mask2')
_AUTO_PROGRESS_TILES = 8
Tile = Tuple[int, int]


def batch(kernel_fn: Callable[..., Any],
          batch_size: int = 0,
          device_count: int = -1,
          store_on_device: bool = True,
          checkpoint_dir: Optional[str] = None,
          progress: Optional[bool] = None,
          gather: bool = True) -> Callable[..., Any]:
  """Returns `kernel_fn` computed in tiles, over devices and hosts.

  Args:
    kernel_fn: `kernel_fn(x1, x2=None, get=None, *args, **kwargs)` returning an
      array `(N1, N2, ...)`, a namedtuple of such arrays, a `Kernel` (`cov1`
      `(N1, ...)`, `cov2` `(N2, ...)` or None), or a pytree of those. `x1`,
      `x2` are arrays or pytrees of arrays with leading axes `N1`, `N2`.
      Must be traceable by `jax.jit`; extra positional and keyword arguments
      (`get`, `params`) are passed through: arrays among them as traced
      arguments, everything else as static values.
    batch_size: examples per tile side; need not divide `N1` or `N2`. 0: one
      tile (split into row blocks across devices when there are several).
    device_count: local devices to use; -1 all, 0 only the default device.
    store_on_device: keep the result in device memory (on the first local
      device); False assembles it in host memory (numpy) for kernels larger
      than a device.
    checkpoint_dir: directory to which every finished tile is written; a
      restarted call with the same arguments resumes from it. A directory
      written for other inputs, arguments, `batch_size`, `get` or another
      kernel function (jaxpr fingerprint) is refused with a `ValueError`;
      corrupt tiles are recomputed.
    progress: report tiles done and time left; None: only when there are
      more than a handful of tiles.
    gather: under multiple processes (or with several devices), True returns
      the complete result on every host; False a `jax.Array` sharded along
      `N1` over all devices (`N1` must divide evenly).

  Returns:
    A function with the signature and results of `kernel_fn`. Under
    `jax.jit` (traced inputs) it computes the kernel in one piece, with the
    same values: tiling, devices and checkpoints apply to eager calls.
  """
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
    raise ValueError(f'batch_size must be an integer >= 0, got {batch_size!r}.')
  if not isinstance(device_count, (int, np.integer)) or device_count < -1:
    raise ValueError(f'device_count must be -1, 0 or positive, got '
                     f'{device_count!r}.')
  cache: Dict[Any, Callable[..., Any]] = {}

  @functools.wraps(kernel_fn)
  def batched_kernel_fn(x1: Any, x2: Any = None, *args: Any, **kwargs: Any) -> Any:
    if isinstance(x1, Kernel) or isinstance(x2, Kernel):
      raise NotImplementedError(
          'batch() takes inputs x1, x2; composing with a Kernel input is not '
          'supported. Batch the kernel function that produces the inputs.')
    if any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves((x1, x2))):
      # Under `jax.jit` the tiles cannot be stored or assembled on the host:
      # the whole kernel is one traced computation.
      return kernel_fn(x1, x2, *args, **kwargs)
    run = _Run(kernel_fn, int(batch_size), int(device_count), store_on_device,
               checkpoint_dir, progress, gather, cache, x1, x2, args, kwargs)
    return run.execute()

  return batched_kernel_fn


def _batch_len(x: Any, name: str) -> Tuple[Any, int]:
  leaves, treedef = jax.tree_util.tree_flatten(x)
  if not leaves:
    raise ValueError(f'{name} holds no arrays.')
  leaves = [np.asarray(l) for l in leaves]
  leaves = [l.astype(jax.dtypes.canonicalize_dtype(l.dtype), copy=False)
            for l in leaves]
  sizes = {l.shape[0] if l.ndim else None for l in leaves}
  if None in sizes:
    raise ValueError(f'Every leaf of {name} needs a leading batch axis; got '
                     f'shapes {[l.shape for l in leaves]}.')
  if len(sizes) != 1:
    raise ValueError(f'Leaves of {name} disagree on the batch size: shapes '
                     f'{[l.shape for l in leaves]}.')
  n = sizes.pop()
  if n == 0:
    raise ValueError(f'{name} has no examples.')
  return jax.tree_util.tree_unflatten(treedef, leaves), n


def _is_array(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array))


def _find_get(args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
  get = kwargs['get'] if 'get' in kwargs else (args[0] if args else None)
  if isinstance(get, str) or (isinstance(get, tuple) and
                              all(isinstance(g, str) for g in get)):
    return get
  return None


def _key_name(key: Any) -> str:
  for attr in ('name', 'key', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _parent(tree: Any, path: Sequence[Any]) -> Any:
  node = tree
  for key in path[:-1]:
    if hasattr(key, 'name'):
      node = getattr(node, key.name)
    elif hasattr(key, 'key'):
      node = node[key.key]
    else:
      node = node[key.idx]
  return node


def _pair_perm(extra: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
  """Mirror permutation for paired extra axes, or None if they do not pair."""
  if len(extra) % 2 or any(extra[k] != extra[k + 1]
                           for k in range(0, len(extra), 2)):
    return None
  perm = [1, 0]
  for k in range(2, 2 + len(extra), 2):
    perm += [k + 1, k]
  return tuple(perm)


def _call_kernel_fn(kernel_fn, arg_tree, statics, dyn_idx, xa, xb, dyn):
  leaves = dict(statics)
  leaves.update(zip(dyn_idx, dyn))
  args, kwargs = jax.tree_util.tree_unflatten(
      arg_tree, [leaves[i] for i in range(len(leaves))])
  return kernel_fn(xa, xb, *args, **kwargs)


def _named_leaves(out: Any) -> Dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(out)
  return {jax.tree_util.keystr(p) or 'out': v for p, v in flat}


def _fix_shapes(out: Any, n1: int, n2: int) -> Any:
  """Sets the batch entry of `shape1`/`shape2` in every `Kernel` to N1/N2."""
  def fix(k):
    if not isinstance(k, Kernel):
      return k
    def full(shape, n):
      if not shape:
        return shape
      s = list(shape)
      s[k.batch_axis] = n
      return tuple(s)
    return k.replace(shape1=full(k.shape1, n1), shape2=full(k.shape2, n2))
  return jax.tree_util.tree_map(fix, out, is_leaf=lambda k: isinstance(k, Kernel))


class _Run:
  """One call of a batched kernel function: plan, compute, assemble."""

  def __init__(self, kernel_fn, batch_size, device_count, store_on_device,
               checkpoint_dir, progress, gather, cache, x1, x2, args, kwargs):
    self.kernel_fn, self.cache = kernel_fn, cache
    self.store_on_device, self.gather = store_on_device, gather
    self.checkpoint_dir, self.progress = checkpoint_dir, progress
    self.mode = 'none' if x2 is None else ('same' if x2 is x1 else 'general')
    self.x1, self.n1 = _batch_len(x1, 'x1')
    self.x2, self.n2 = (self.x1, self.n1) if self.mode != 'general' else \
        _batch_len(x2, 'x2')
    if self.mode == 'general' and (jax.tree_util.tree_structure(self.x1) !=
                                   jax.tree_util.tree_structure(self.x2)):
      raise ValueError('x1 and x2 must have the same pytree structure.')
    self.get = _find_get(args, kwargs)
    leaves, self.arg_tree = jax.tree_util.tree_flatten((args, kwargs))
    self.dyn_idx = tuple(i for i, l in enumerate(leaves) if _is_array(l))
    self.dyn = [leaves[i] for i in self.dyn_idx]
    self.statics = tuple((i, l) for i, l in enumerate(leaves)
                         if i not in self.dyn_idx)
    local = jax.local_devices()
    if device_count > len(local):
      raise ValueError(f'device_count={device_count} but only {len(local)} '
                       f'local devices exist.')
    self.devices = local[:1] if device_count == 0 else (
        local if device_count == -1 else local[:device_count])
    self.mesh = Mesh(np.array(self.devices), ('tiles',))
    self.nproc, self.pid = jax.process_count(), jax.process_index()
    self.triangle = self.mode != 'general'
    d = len(self.devices)
    if batch_size:
      self.b1, self.b2 = min(batch_size, self.n1), min(batch_size, self.n2)
    elif self.triangle:
      self.b1 = self.b2 = -(-self.n1 // d)
    else:
      self.b1, self.b2 = -(-self.n1 // d), self.n2
    self.batch_size = batch_size
    self.nb1, self.nb2 = -(-self.n1 // self.b1), -(-self.n2 // self.b2)

  # Kernel-function plumbing. ------------------------------------------------

  def _call(self, xa, xb, dyn):
    return _call_kernel_fn(self.kernel_fn, self.arg_tree, self.statics,
                           self.dyn_idx, xa, xb, dyn)

  def _is_diag_kind(self, tile: Tile) -> bool:
    return self.mode == 'none' and tile[0] == tile[1]

  def _named(self, out: Any) -> Dict[str, Any]:
    return _named_leaves(out)

  def _shape_struct(self, x, b):
    return jax.tree_util.tree_map(
        lambda l: jax.ShapeDtypeStruct((b,) + l.shape[1:], l.dtype), x)

  def _plan_outputs(self) -> None:
    """Finds the output structure, each leaf's role and mirror permutation."""
    dyn = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in self.dyn]
    xa, xb = self._shape_struct(self.x1, self.b1), self._shape_struct(self.x2, self.b2)
    has_off = not self.triangle or self.nb1 > 1 or self.mode == 'same'
    off = jax.eval_shape(self._call, xa, xb, dyn) if has_off else None
    diag = jax.eval_shape(self._call, xa, None, dyn) if self.mode == 'none' else None
    self.out_struct = diag if self.mode == 'none' else off
    self.specs: Dict[str, Tuple[str, Any, Optional[Tuple[int, ...]]]] = {}
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(self.out_struct)
    off_names = self._named(off) if off is not None else {}
    probe_needed = []
    for path, leaf in flat:
      name = jax.tree_util.keystr(path) or 'out'
      field = _key_name(path[-1]) if path else (self.get if isinstance(
          self.get, str) else 'out')
      role = 'row' if field in _ROW_FIELDS else (
          'col' if field in _COL_FIELDS else 'pair')
      lead = {'pair': (self.b1, self.b2), 'row': (self.b1,), 'col': (self.b2,)}[role]
      if tuple(leaf.shape[:len(lead)]) != lead:
        raise ValueError(
            f'Output {name} of kernel_fn has shape {leaf.shape} on a '
            f'{self.b1}x{self.b2} tile; expected leading axes {lead}.')
      if role == 'pair' and off is not None and name not in off_names:
        raise ValueError(f'Output {name} is missing when x2 is given.')
      perm = None
      if role == 'pair' and self.triangle:
        extra = tuple(leaf.shape[2:])
        parent = _parent(self.out_struct, path) if path else None
        if not extra:
          perm = (1, 0)
        elif isinstance(parent, Kernel):
          perm = ((1, 0) + tuple(range(2, 2 + len(extra)))
                  if parent.diagonal_spatial else _pair_perm(extra))
        else:
          probe_needed.append(name)
      self.specs[name] = (role, leaf, perm)
    if probe_needed and self.nb1 > 1:
      self._probe_mirrors(probe_needed)

  def _probe_mirrors(self, names: List[str]) -> None:
    """Picks the mirror layout of bare extra axes from a 2-example probe."""
    xp = jax.tree_util.tree_map(lambda l: l[:2], self.x1)
    probe = self._named(jax.jit(self._call)(xp, xp, self.dyn))
    for name in names:
      k = np.asarray(probe[name])
      tol = (1e-10 if k.dtype == np.float64 else 1e-4)
      atol = tol * max(float(np.max(np.abs(k))), 1e-30)
      candidates = [p for p in (_pair_perm(k.shape[2:]),
                                (1, 0) + tuple(range(2, k.ndim))) if p]
      fits = [p for p in candidates
              if np.allclose(np.transpose(k, p), k, rtol=tol, atol=atol)]
      role, leaf, _ = self.specs[name]
      # Both fitting means the probe cannot tell the layouts apart.
      self.specs[name] = (role, leaf, fits[0] if len(fits) == 1 else None)

  # Tiles. --------------------------------------------------------------------

  def _tiles(self) -> List[Tile]:
    if not self.triangle:
      return [(i, j) for i in range(self.nb1) for j in range(self.nb2)]
    mirror_all = all(s[2] is not None for s in self.specs.values()
                     if s[0] == 'pair')
    diag = [(i, i) for i in range(self.nb1)]
    upper = [(i, j) for i in range(self.nb1) for j in range(i + 1, self.nb1)]
    lower = [] if mirror_all else [(j, i) for i, j in upper]
    self.mirror = mirror_all
    return diag + upper + lower

  def _rows(self, i: int, b: int, n: int) -> np.ndarray:
    idx = np.arange(i * b, (i + 1) * b)
    return np.minimum(idx, n - 1)  # pad a ragged block by repeating an example

  def _compute_fn(self, diag: bool) -> Callable[..., Any]:
    key = (diag, self.arg_tree, self.statics, tuple(self.devices), self.mode,
           tuple(self.specs))
    try:
      fn = self.cache.get(key)
    except TypeError:  # unhashable static arguments: compile per call
      key, fn = None, None
    if fn is None:
      names = tuple(self.specs)
      call = functools.partial(_call_kernel_fn, self.kernel_fn, self.arg_tree,
                               self.statics, self.dyn_idx)
      def per_device(xa, xb, dyn):
        xa = jax.tree_util.tree_map(lambda l: l[0], xa)
        xb = None if diag else jax.tree_util.tree_map(lambda l: l[0], xb)
        out = _named_leaves(call(xa, xb, dyn))
        return {n: out[n][None] for n in names if n in out}
      spec = PartitionSpec('tiles')
      fn = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                 in_specs=(spec, spec, PartitionSpec()),
                                 out_specs=spec, check_vma=False))
      if key is not None:
        self.cache[key] = fn
    return fn

  def _compute(self, tiles: List[Tile]) -> Dict[Tile, Dict[str, Any]]:
    """Computes tiles of one kind on the local devices, one per device."""
    d = len(self.devices)
    slots = tiles + [tiles[-1]] * (d - len(tiles))
    idx1 = np.stack([self._rows(i, self.b1, self.n1) for i, _ in slots])
    idx2 = np.stack([self._rows(j, self.b2, self.n2) for _, j in slots])
    sharding = NamedSharding(self.mesh, PartitionSpec('tiles'))
    xa = jax.device_put(jax.tree_util.tree_map(lambda l: l[idx1], self.x1), sharding)
    xb = jax.device_put(jax.tree_util.tree_map(lambda l: l[idx2], self.x2), sharding)
    out = self._compute_fn(self._is_diag_kind(tiles[0]))(xa, xb, self.dyn)
    results: Dict[Tile, Dict[str, Any]] = {t: {} for t in tiles}
    for name, arr in out.items():
      for shard in arr.addressable_shards:
        t = shard.index[0].start or 0
        if t < len(tiles):
          results[tiles[t]][name] = shard.data[0]
    return results

  def _crop(self, tile: Tile, name: str, a: Any) -> Any:
    role = self.specs[name][0]
    h = min(self.b1, self.n1 - tile[0] * self.b1)
    w = min(self.b2, self.n2 - tile[1] * self.b2)
    return {'pair': lambda: a[:h, :w], 'row': lambda: a[:h],
            'col': lambda: a[:w]}[role]()

  def _pad(self, name: str, a: np.ndarray) -> np.ndarray:
    full = self.specs[name][1].shape
    return np.pad(a, [(0, f - s) for f, s in zip(full, a.shape)])

  # Assembly. -----------------------------------------------------------------

  def _write(self, tile: Tile, data: Dict[str, Any]) -> None:
    """Writes one tile (and its mirror image) into the result buffers."""
    i, j = tile
    for name, (role, _, perm) in self.specs.items():
      if name not in data:
        continue
      if role == 'row' and self.row_source[i] != tile:
        continue
      if role == 'col' and self.col_source[j] != tile:
        continue
      block = self._crop(tile, name, data[name])
      start = {'pair': (i * self.b1, j * self.b2), 'row': (i * self.b1,),
               'col': (j * self.b2,)}[role]
      self.sink.write(name, role, block, start, None)
      if role == 'pair' and self.triangle and i != j and self.mirror:
        self.sink.write(name, role, block, (j * self.b2, i * self.b1), perm)

  def _exchange(self, results: Dict[Tile, Dict[str, Any]], slots: int
                ) -> Dict[Tile, Dict[str, Any]]:
    """Every process receives the tiles that every other process computed."""
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    tiles = list(results)
    ids = np.full((slots, 2), -1, np.int64)
    ids[:len(tiles)] = tiles
    payload = {'ids': ids}
    for name, (_, leaf, _) in self.specs.items():
      buf = np.zeros((slots,) + tuple(leaf.shape), leaf.dtype)
      for k, t in enumerate(tiles):
        if name in results[t]:
          buf[k] = self._pad(name, np.asarray(results[t][name]))
      payload[name] = buf
    got = multihost_utils.process_allgather(payload)
    merged = {}
    for p in range(self.nproc):
      for k in range(slots):
        t = tuple(int(v) for v in got['ids'][p, k])
        if t[0] >= 0:
          merged[t] = {n: got[n][p, k] for n in self.specs}
    return merged

  def execute(self) -> Any:
    self._plan_outputs()
    tiles = self._tiles()
    if self.triangle:
      self.row_source = {i: (i, i) for i in range(self.nb1)}
      self.col_source = {j: ((j, j) if self.mode == 'none' else (0, j))
                         for j in range(self.nb2)}
    else:
      self.row_source = {i: (i, 0) for i in range(self.nb1)}
      self.col_source = {j: (0, j) for j in range(self.nb2)}
    store = self._open_store() if self.checkpoint_dir else None
    own = tiles[self.pid::self.nproc]
    own.sort(key=lambda t: not self._is_diag_kind(t))
    d = len(self.devices)
    steps = math.ceil(len(own) / d)
    multi = self.nproc > 1
    if multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      steps = int(np.max(multihost_utils.process_allgather(np.int64(steps))))
      slots = int(np.max(multihost_utils.process_allgather(np.int64(d))))
    self.sink = self._make_sink()
    todo = sum(1 for t in own if not (store and store.has(t)))
    show = (todo > _AUTO_PROGRESS_TILES if self.progress is None
            else bool(self.progress)) and self.pid == 0
    bar = bio.Progress(todo, show)
    try:
      for s in range(steps):
        group = own[s * d:(s + 1) * d]
        results = {}
        for t in group:
          cached = store.load(t) if store and store.has(t) else None
          if cached is not None:
            results[t] = {n: self._pad(n, a) for n, a in cached.items()}
        missing = [t for t in group if t not in results]
        for diag in (True, False):
          kind = [t for t in missing if self._is_diag_kind(t) == diag]
          if kind:
            computed = self._compute(kind)
            results.update(computed)
            if store:
              for t in kind:
                store.save(t, {n: np.asarray(self._crop(t, n, a))
                               for n, a in computed[t].items()})
        if multi:
          results = self._exchange(results, slots)
        for t, data in results.items():
          self._write(t, data)
        bar.update(len(missing))
    finally:
      bar.close()
    return self._finish()

  def _open_store(self) -> bio.TileStore:
    hasher = hashlib.sha256()
    for x in ((self.x1,) if self.mode != 'general' else (self.x1, self.x2)):
      hasher.update(str(jax.tree_util.tree_structure(x)).encode())
      bio.hash_arrays(hasher, jax.tree_util.tree_leaves(x))
    bio.hash_arrays(hasher, self.dyn)
    one1 = jax.tree_util.tree_map(lambda l: l[:1], self.x1)
    one2 = None if self.mode == 'none' else jax.tree_util.tree_map(
        lambda l: l[:1], self.x2)
    manifest = {
        'inputs_sha256': hasher.hexdigest(),
        'static_args': bio.stable_repr((self.arg_tree, self.statics)),
        'n1': self.n1, 'n2': self.n2, 'batch_size': self.batch_size,
        'tile_shape': [self.b1, self.b2], 'x2': self.mode,
        'get': bio.stable_repr(self.get),
        'kernel_fn': bio.kernel_fingerprint(self._call, one1, one2, self.dyn),
    }
    return bio.TileStore(self.checkpoint_dir, manifest, list(self.specs))

  def _global_sharding(self, role: str) -> NamedSharding:
    mesh = Mesh(np.array(jax.devices()), ('rows',))
    return NamedSharding(mesh, PartitionSpec('rows') if role != 'col'
                         else PartitionSpec())

  def _make_sink(self) -> '_Sink':
    shapes = {}
    for name, (role, leaf, _) in self.specs.items():
      lead = {'pair': (self.n1, self.n2), 'row': (self.n1,),
              'col': (self.n2,)}[role]
      shapes[name] = (lead + tuple(leaf.shape[len(lead):]), leaf.dtype, role)
    if not self.gather:
      ndev = jax.device_count()
      if self.n1 % ndev:
        raise ValueError(
            f'gather=False shards N1={self.n1} rows over {ndev} devices, which '
            f'needs N1 divisible by {ndev}; use gather=True.')
      idx = self._global_sharding('row').addressable_devices_indices_map(
          (self.n1,)).values()
      window = (min(s[0].start or 0 for s in idx),
                max(s[0].stop or self.n1 for s in idx))
      return _HostSink(shapes, window)
    if self.store_on_device and self.nproc == 1:
      return _DeviceSink(shapes, self.devices[0])
    return _HostSink(shapes, (0, self.n1))

  def _finish(self) -> Any:
    arrays = []
    for name, (role, _, _) in self.specs.items():
      a = self.sink.result(name)
      if not self.gather:
        shape = self.sink.shapes[name][0]
        lo = self.sink.window[0] if role != 'col' else 0
        a = jax.make_array_from_callback(
            shape, self._global_sharding(role),
            lambda index, a=a, lo=lo: a[(slice((index[0].start or 0) - lo,
                                               (index[0].stop or shape[0]) - lo),)
                                        + tuple(index[1:])])
      elif self.store_on_device and self.nproc > 1:
        a = jax.device_put(a, self.devices[0])
      arrays.append(a)
    out = jax.tree_util.tree_unflatten(self.treedef, arrays)
    return _fix_shapes(out, self.n1, self.n2)


class _Sink:
  shapes: Dict[str, Tuple[Tuple[int, ...], Any, str]]

  def write(self, name, role, block, start, perm) -> None:
    raise NotImplementedError

  def result(self, name: str) -> Any:
    raise NotImplementedError


class _HostSink(_Sink):
  """Result buffers in host memory; keeps rows `window` of N1 only."""

  def __init__(self, shapes, window: Tuple[int, int]):
    self.shapes, self.window = shapes, window
    self.buffers = {}
    for name, (shape, dtype, role) in shapes.items():
      if role != 'col':
        shape = (window[1] - window[0],) + tuple(shape[1:])
      self.buffers[name] = np.empty(shape, dtype)

  def write(self, name, role, block, start, perm):
    block = np.asarray(block)
    if perm is not None:
      block = np.transpose(block, perm)
    lo, hi = self.window if role != 'col' else (0, self.shapes[name][0][0])
    r0, r1 = max(start[0], lo), min(start[0] + block.shape[0], hi)
    if r0 >= r1:
      return
    index = (slice(r0 - lo, r1 - lo),) + tuple(
        slice(s, s + n) for s, n in zip(start[1:], block.shape[1:]))
    self.buffers[name][index] = block[r0 - start[0]:r1 - start[0]]

  def result(self, name):
    return self.buffers[name]


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _place(buffer: jax.Array, block: jax.Array, start: jax.Array,
           perm: Optional[Tuple[int, ...]]) -> jax.Array:
  if perm is not None:
    block = jnp.transpose(block, perm)
  zero = jnp.zeros((), start.dtype)
  starts = tuple(start) + (zero,) * (buffer.ndim - start.shape[0])
  return jax.lax.dynamic_update_slice(buffer, block.astype(buffer.dtype), starts)


class _DeviceSink(_Sink):
  """Result buffers on one device, updated in place tile by tile."""

  def __init__(self, shapes, device):
    self.shapes, self.device = shapes, device
    self.buffers = {name: jnp.zeros(shape, dtype, device=device)
                    for name, (shape, dtype, _) in shapes.items()}

  def write(self, name, role, block, start, perm):
    block = jax.device_put(block, self.device)
    self.buffers[name] = _place(self.buffers[name], block,
                                np.asarray(start, np.int32), perm)

  def result(self, name):
    return self.buffers[name]
