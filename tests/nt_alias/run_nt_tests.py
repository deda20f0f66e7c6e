"""Runs Neural Tangents' own test suite against infwidth, by file.

Usage: python tests/nt_alias/run_nt_tests.py PATH_TO_NEURAL_TANGENTS_CHECKOUT [files...]

Copies the checkout's `tests/` into a temporary folder and runs each test file
with pytest, `neural_tangents` resolving to the alias package next to this
script (infwidth's public API under NT's names; `_src` offers only the
testing NTK implementation). Files that import other private NT modules
(`neural_tangents._src.utils`, `_src.batching`, ...) fail at import and are
reported as such. Prints passed / failed / skipped / errors per file.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  checkout, files = sys.argv[1], sys.argv[2:]
  logs = tempfile.mkdtemp(prefix='nt_tests_logs_')
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copytree(os.path.join(checkout, 'tests'), os.path.join(tmp, 'tests'))
    if not files:
      files = sorted(os.path.relpath(os.path.join(d, f), tmp)
                     for d, _, fs in os.walk(os.path.join(tmp, 'tests'))
                     for f in fs if f.endswith('_test.py') and 'experimental' not in d)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, tmp]))
    print(f'{"file":40s} {"passed":>7s} {"failed":>7s} {"skipped":>8s} {"errors":>7s}')
    for f in files:
      out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            f], cwd=tmp, env=env, capture_output=True, text=True)
      tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-200:]
      counts = {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|skipped|error)', tail)}
      print(f'{f:40s} {counts.get("passed", 0):7d} {counts.get("failed", 0):7d} '
            f'{counts.get("skipped", 0):8d} {counts.get("error", 0):7d}', flush=True)
      with open(os.path.join(logs, os.path.basename(f) + '.log'), 'w') as log:
        log.write(out.stdout[-200000:] + out.stderr[-20000:])
  print(f'pytest output per file: {logs}')


if __name__ == '__main__':
  main()
