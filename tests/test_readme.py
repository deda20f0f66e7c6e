"""The README's code runs as written: its Python blocks, in order, in one namespace."""

import os
import re
import warnings

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def test_readme_python_blocks_run():
  with open(README) as f:
    blocks = re.findall(r'```python\n(.*?)```', f.read(), flags=re.S)
  assert len(blocks) >= 2
  namespace = {}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # small-sample estimates in the example
    for block in blocks:
      exec(compile(block, README, 'exec'), namespace)  # noqa: S102
  mean, cov = namespace['mean'], namespace['cov']
  assert mean.shape == (5, 1) and cov.shape == (5, 5)
  assert namespace['k'].shape == (20, 5)
