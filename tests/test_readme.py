"""Every ```python block of README.md runs as written, in order, in one namespace."""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
_BLOCK = re.compile(r'^```python\n(.*?)^```', re.S | re.M)


def _blocks():
  return _BLOCK.findall(README.read_text())


def test_readme_has_python_blocks():
  assert len(_blocks()) >= 2


def test_readme_blocks_run():
  namespace = {'__name__': '__readme__'}
  # Later blocks use names the earlier ones define, as a reader would.
  for i, block in enumerate(_blocks()):
    try:
      exec(compile(block, f'README.md block {i}', 'exec'), namespace)
    except Exception as e:  # pragma: no cover - the message is the point
      pytest.fail(f'README.md python block {i} failed: {type(e).__name__}: {e}\n{block}')
  # The first example's results have the documented shapes and are finite.
  assert namespace['k'].shape == (20, 5)
  assert namespace['mean'].shape == (5, 1) and namespace['cov'].shape == (5, 5)
  assert bool(jax.numpy.isfinite(namespace['cov']).all())
