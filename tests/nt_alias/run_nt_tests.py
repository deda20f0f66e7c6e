"""Runs Neural Tangents' own test suite against infwidth, by file.

Usage:

    python tests/nt_alias/run_nt_tests.py NT_CHECKOUT [files...] [-k EXPR] [--markdown]
        [--timeout SECONDS] [--host-devices N]

`NT_CHECKOUT` is a folder holding NT's `tests/` (for instance
`git -C NEURAL_TANGENTS_REPO archive v0.6.5 tests | tar -x -C NT_CHECKOUT`).
Without `files`, runs `PUBLIC_API_FILES`: every test file of NT that exercises
only its public API (`stax`, `predict`, `empirical`, `batch`, `monte_carlo`,
`Kernel`). The files left out test NT-private modules (`rules_test.py`: NT's
structured-derivative rules) or run NT's `examples/`, which download data sets
with TensorFlow Datasets.

The checkout's `tests/` is copied into a temporary folder and each file runs
under pytest in its own process, `neural_tangents` resolving to the alias
package next to this script (infwidth's public API under NT's names; NT's
private helpers are stand-ins that raise `NotImplementedError`, so that only
the tests calling them fail) and `infwidth` to the checkout this script lives
in. NT's tests draw `NT_NUM_GENERATED_CASES` (default 4) cases from each
parameterised sweep with a fixed seed, so a run is deterministic. A file
running past `--timeout` is stopped and counted from pytest's progress line.
NT's tests simulate several devices on a CPU by replacing NT's private `pmap`;
`--host-devices 2` gives infwidth two real XLA host devices instead.

The table in benchmarks/RESULTS.md ("Neural Tangents' test suite against
infwidth") comes from

    git -C NEURAL_TANGENTS_REPO archive v0.6.5 tests | tar -x -C /tmp/ntsrc065
    NT_NUM_GENERATED_CASES=1 python tests/nt_alias/run_nt_tests.py /tmp/ntsrc065 \
        --timeout 300 --markdown

Prints passed / failed / skipped / errors per file, counting tests (a test
with failing subtests counts once), then each failing test's first error line
grouped by message; `--markdown` prints the table as Markdown. pytest's output
per file is kept in a temporary folder whose path is printed at the end.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

PUBLIC_API_FILES = [
    'tests/stax/branching_test.py',
    'tests/stax/combinators_test.py',
    'tests/stax/elementwise_test.py',
    'tests/stax/linear_test.py',
    'tests/stax/requirements_test.py',
    'tests/stax/stax_test.py',
    'tests/batching_test.py',
    'tests/empirical_test.py',
    'tests/monte_carlo_test.py',
    'tests/predict_test.py',
]


def _first_line(message):
  for line in (message or '').splitlines():
    line = line.strip()
    if line and not line.startswith(('For simplicity', '----')):
      return line[:300]
  return ''


def _outcomes(junit):
  """Test id -> (outcome, first line of its error) from pytest's JUnit XML."""
  out = {}
  for case in ET.parse(junit).getroot().iter('testcase'):
    name = f'{case.get("classname")}::{case.get("name")}'
    outcome, message = 'passed', ''
    for child in case:
      if child.tag in ('failure', 'error', 'skipped'):
        outcome = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}[child.tag]
        message = _first_line(child.get('message') or child.text)
        break
    if out.get(name, ('passed',))[0] in ('failed', 'error'):
      continue  # a test's failing subtest decides its outcome
    out[name] = (outcome, message)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('checkout')
  parser.add_argument('files', nargs='*')
  parser.add_argument('-k', default=None, help="pytest's -k expression, for every file")
  parser.add_argument('--markdown', action='store_true')
  parser.add_argument('--timeout', type=int, default=3600, help='seconds per file')
  parser.add_argument('--host-devices', type=int, default=0,
                      help='split the CPU into this many XLA devices, where NT\'s tests '
                      'simulate several devices by replacing its private pmap with vmap')
  args = parser.parse_args()
  files = args.files or PUBLIC_API_FILES
  logs = tempfile.mkdtemp(prefix='nt_tests_logs_')
  causes = collections.defaultdict(list)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    shutil.copytree(os.path.join(args.checkout, 'tests'), os.path.join(tmp, 'tests'))
    path = [HERE, REPO, tmp] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if args.host_devices:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={args.host_devices}')
    print(f'{"file":36s} {"passed":>7s} {"failed":>7s} {"skipped":>8s} {"errors":>7s} {"time":>7s}',
          flush=True)
    for f in files:
      junit = os.path.join(logs, os.path.basename(f) + '.xml')
      cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-o',
             'junit_logging=no', f'--junitxml={junit}', f]
      if args.k:
        cmd += ['-k', args.k]
      start = time.time()
      try:
        out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                             timeout=args.timeout)
        stdout, stderr = out.stdout, out.stderr
      except subprocess.TimeoutExpired as e:
        stdout, stderr = (e.stdout or b'').decode(), f'timed out after {args.timeout} s'
      seconds = time.time() - start
      with open(os.path.join(logs, os.path.basename(f) + '.log'), 'w') as log:
        log.write(stdout[-400000:] + stderr[-20000:])
      counts = collections.Counter()
      if os.path.exists(junit):
        for name, (outcome, message) in _outcomes(junit).items():
          counts[outcome] += 1
          if outcome in ('failed', 'error'):
            causes[re.sub(r'0x[0-9a-f]+', '0x..', message)].append(f'{f}::{name.split("::")[-1]}')
      elif 'timed out' in stderr:
        # pytest -q's progress line: one character per finished test (or subtest)
        progress = ''.join(re.findall(r'^([.FsEux,-]+)(?:\s+\[|$)', stdout, re.M))
        counts.update(passed=progress.count('.'), failed=progress.count('F'),
                      skipped=progress.count('s'), error=progress.count('E'))
        causes[f'{stderr} (counts from the progress line, subtests included)'].append(f)
      else:
        counts['error'] += 1
        causes[_first_line(stderr[-300:])].append(f)
      rows.append((f, counts['passed'], counts['failed'], counts['skipped'], counts['error'],
                   seconds))
      print(f'{f:36s} {counts["passed"]:7d} {counts["failed"]:7d} {counts["skipped"]:8d} '
            f'{counts["error"]:7d} {seconds:6.0f}s', flush=True)
  total = [sum(r[i] for r in rows) for i in range(1, 6)]
  print(f'{"total":36s} {total[0]:7d} {total[1]:7d} {total[2]:8d} {total[3]:7d} {total[4]:6.0f}s')
  if args.markdown:
    print('\n| file | passed | failed | skipped | errors | time (s) |\n|---|---|---|---|---|---|')
    for r in rows + [('total', *total)]:
      print(f'| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.0f} |')
  print('\nfailures by first error line:')
  for message, tests in sorted(causes.items(), key=lambda kv: -len(kv[1])):
    print(f'{len(tests):4d}  {message}')
    for t in tests[:3]:
      print(f'        {t}')
  print(f'\npytest output and JUnit XML per file: {logs}')


if __name__ == '__main__':
  main()
