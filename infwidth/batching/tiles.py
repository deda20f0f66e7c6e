"""Disk checkpoints, fingerprints and progress reporting for `infwidth.batch`.

A checkpoint directory holds `manifest.json`, which says what is being
computed, and for every finished tile `(i, j)` one plain `.npy` file per output
leaf plus a sidecar `tile_i_j.json` with the SHA-256 of each file. The sidecar
is written last, so it marks the tile as complete. Every file is written to a
temporary name and moved into place with `os.replace`, so a killed run leaves
either a whole file or none. Arrays are read with `np.load(allow_pickle=False)`
after their checksum is verified: a directory from elsewhere cannot run code,
and a truncated or altered tile is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from infwidth.interpreters.walker import trace

_FORMAT_VERSION = 1
_HEX_ADDRESS = re.compile(r'0x[0-9a-fA-F]+')


def hash_arrays(hasher: Any, leaves: Sequence[Any]) -> None:
  """Feeds dtype, shape and bytes of every array in `leaves` to `hasher`."""
  for leaf in leaves:
    a = np.ascontiguousarray(np.asarray(leaf))
    hasher.update(f'{a.dtype.str}{a.shape}'.encode())
    hasher.update(memoryview(a).cast('B'))


def stable_repr(value: Any) -> str:
  """`repr` without memory addresses, so it is the same in every process."""
  return _HEX_ADDRESS.sub('0x?', repr(value))


def kernel_fingerprint(fn: Callable[..., Any], *example_args: Any) -> str:
  """SHA-256 of the jaxpr of `fn` on one example, and of its constants.

  The jaxpr is the computation itself: kernel functions built by a factory
  (`kernelize(apply_fn)`, a layer library's `serial`) share one Python code
  object for every architecture, so a hash of the code would not tell two
  networks apart, while their jaxprs differ. Closed-over arrays (parameters,
  fixed feature maps) become constants of the jaxpr and are hashed by value.
  Tracing costs no compilation. The text may change with the JAX version; a
  directory written under another version is then refused, never misused.
  """
  closed = trace(fn, *example_args)
  hasher = hashlib.sha256(stable_repr(closed.jaxpr).encode())
  hash_arrays(hasher, [c for c in closed.consts if hasattr(c, 'shape')])
  return hasher.hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class TileStore:
  """Finished tiles of one kernel computation in a directory.

  Args:
    directory: where tiles live; created if missing.
    manifest: JSON-serialisable description of the computation. A directory
      whose manifest differs is refused with a `ValueError`.
    leaf_names: names of the output leaves, in a fixed order.
  """

  def __init__(self, directory: str, manifest: Dict[str, Any],
               leaf_names: Sequence[str]):
    self.directory = directory
    self.leaf_names = tuple(leaf_names)
    manifest = dict(manifest, format=_FORMAT_VERSION, leaves=list(leaf_names))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, 'manifest.json')
    if os.path.exists(path):
      with open(path) as f:
        try:
          old = json.load(f)
        except ValueError:
          old = {'unreadable': True}
      differ = sorted(k for k in set(old) | set(manifest)
                      if old.get(k) != manifest.get(k))
      if differ:
        raise ValueError(
            f'checkpoint_dir {directory!r} holds tiles of a different '
            f'computation (manifest differs in: {", ".join(differ)}). Use a '
            f'new directory, or delete this one to start over.')
    else:
      _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True).encode())

  def _sidecar(self, tile: Tuple[int, int]) -> str:
    return os.path.join(self.directory, f'tile_{tile[0]}_{tile[1]}.json')

  def has(self, tile: Tuple[int, int]) -> bool:
    """Whether a finished tile is recorded (not yet verified)."""
    return os.path.exists(self._sidecar(tile))

  def load(self, tile: Tuple[int, int]) -> Optional[Dict[str, np.ndarray]]:
    """Returns the verified arrays of `tile`, or None if missing or corrupt."""
    try:
      with open(self._sidecar(tile)) as f:
        sidecar = json.load(f)
      out = {}
      for name, entry in sidecar['leaves'].items():
        with open(os.path.join(self.directory, entry['file']), 'rb') as f:
          data = f.read()
        if hashlib.sha256(data).hexdigest() != entry['sha256']:
          raise ValueError('checksum mismatch')
        out[name] = np.load(io.BytesIO(data), allow_pickle=False)
      return out
    except (OSError, ValueError, KeyError, TypeError) as e:
      warnings.warn(f'Checkpointed tile {tile} in {self.directory!r} is '
                    f'missing or corrupt ({e}); recomputing it.')
      return None

  def save(self, tile: Tuple[int, int], arrays: Dict[str, np.ndarray]) -> None:
    """Writes the arrays of a finished tile, then its sidecar."""
    entries = {}
    for name, array in arrays.items():
      buf = io.BytesIO()
      np.save(buf, np.asarray(array), allow_pickle=False)
      data = buf.getvalue()
      fname = f'tile_{tile[0]}_{tile[1]}_leaf{self.leaf_names.index(name)}.npy'
      _atomic_write(os.path.join(self.directory, fname), data)
      entries[name] = {'file': fname, 'sha256': hashlib.sha256(data).hexdigest()}
    _atomic_write(self._sidecar(tile), json.dumps({'leaves': entries}).encode())


class Progress:
  """Tiles done, elapsed time and time left: tqdm if installed, else stderr.

  Args:
    total: number of tiles to compute.
    enabled: whether to report at all.
    every_s: seconds between plain log lines when tqdm is missing.
  """

  def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
    self.total, self.done, self.enabled = total, 0, enabled and total > 0
    self.start = self.last = time.monotonic()
    self.every_s = every_s
    self.bar = None
    if self.enabled:
      try:
        import tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm.tqdm(total=total, unit='tile', desc='infwidth.batch')
      except ImportError:
        pass

  def update(self, n: int) -> None:
    """Records `n` more finished tiles."""
    if not self.enabled or n == 0:
      return
    self.done += n
    if self.bar is not None:
      self.bar.update(n)
      return
    now = time.monotonic()
    if now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      elapsed = now - self.start
      left = elapsed / self.done * (self.total - self.done)
      print(f'infwidth.batch: {self.done}/{self.total} tiles, '
            f'{elapsed:.1f}s elapsed, ~{left:.1f}s left', file=sys.stderr,
            flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
