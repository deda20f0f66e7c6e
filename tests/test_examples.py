"""The example scripts run with --quick and print numbers in the expected range."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(name, tmp_path, needs=('matplotlib', 'sklearn')):
  """Runs examples/<name>.py --quick writing figures to tmp_path; returns stdout.
  `needs`: the modules of the `examples` extra it imports."""
  for module in needs:
    pytest.importorskip(module)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run(
      [sys.executable, str(ROOT / 'examples' / f'{name}.py'), '--quick', f'--out={tmp_path}'],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / f'{name}.png').exists()
  return out.stdout


def numbers(pattern, text):
  return [float(m) for m in re.findall(pattern, text)]


@pytest.mark.slow
def test_infinite_vs_finite(tmp_path):
  text = run_example('infinite_vs_finite', tmp_path)
  inf_train, inf_test = re.search(
      r'NTK\) after \d+ steps: train loss ([\d.]+), test loss ([\d.]+)', text).groups()
  inf_train, inf_test = float(inf_train), float(inf_test)
  assert inf_train < 0.01 and inf_test < 0.1
  gaps = numbers(r'max \|ensemble mean - NTK mean\| ([\d.]+)', text)
  ratios = numbers(r'ensemble std / NTK std ([\d.]+)', text)
  assert len(gaps) == 2 and len(ratios) == 2
  # The wider ensemble is closer to the infinite one, and close in absolute terms.
  assert gaps[1] < gaps[0] and gaps[1] < 0.15
  # 20 networks: the sample std is within ~±35% of the true one (chi, 19 dof, 2σ).
  assert all(0.65 < r < 1.35 for r in ratios)


def test_monte_carlo_convergence(tmp_path):
  """In the default run (about 35 s of CPU): the `test` extra has matplotlib."""
  text = run_example('monte_carlo_convergence', tmp_path, needs=('matplotlib',))
  in_samples = numbers(r'slope in samples \(width \d+\): (-?[\d.]+)', text)
  in_width = numbers(r'slope in width \(\d+ sample\(s\)\): (-?[\d.]+)', text)
  assert len(in_samples) == 2 and len(in_width) == 2  # NNGP and NTK of the MLP
  # Independent samples: error ∝ samples^(-1/2); 3 seeds of 6 counts each.
  assert all(abs(s + 0.5) < 0.15 for s in in_samples), in_samples
  assert all(s < -0.3 for s in in_width), in_width


@pytest.mark.slow
def test_architecture_comparison(tmp_path):
  text = run_example('architecture_comparison', tmp_path)
  for arch in ('FC', 'CNN-Flatten', 'CNN-GAP'):
    for g in ('nngp', 'ntk'):
      line = re.search(rf'^{arch} {g}: accuracy ([\d. ]+)\| mse ([\d. ]+)\|', text, re.M)
      accuracy = [float(a) for a in line.group(1).split()]
      mse = [float(m) for m in line.group(2).split()]
      # 10 classes: chance is 0.1; 200 digits suffice for > 0.9 with any of these kernels.
      assert accuracy[0] > 0.3 and accuracy[-1] > 0.9, (arch, g, accuracy)
      assert mse[-1] < mse[0] < 0.09, (arch, g, mse)
  assert len(re.findall(r'ordering by marginal likelihood', text)) == 2


@pytest.mark.slow
def test_large_kernel(tmp_path):
  text = run_example('large_kernel', tmp_path)
  assert numbers(r'throughput: ([\d.e+-]+) kernel entries/s', text)[0] > 0
  loaded, computed, difference = re.search(
      r'resumed: (\d+) tiles loaded, (\d+) computed, max \|difference\| ([\d.e+-]+)',
      text).groups()
  total = int(re.search(r'of (\d+) tiles on disk', text).group(1))
  # Interrupted halfway: the resumed call computes only the tiles not on disk,
  # with the same compiled tile functions, so the kernel is bitwise the same.
  assert int(loaded) > 0 and int(computed) > 0, text
  assert int(loaded) + int(computed) == total, text
  assert float(difference) == 0.
  worst, fraction = re.search(
      r'cg vs cholesky: max relative difference ([\d.e+-]+) \(at most ([\d.e+-]+) of the '
      r'bound', text).groups()
  # CG stops at relative residual tol=1e-10, which bounds the difference of the
  # predictions (printed per size, about 1e-6 here); both solves are float64.
  assert float(fraction) <= 1. and float(worst) < 1e-6, text
  mse = [float(m) for m in re.search(r'test mse by N: ([\d. ]+) \(', text).group(1).split()]
  floor = float(re.search(r'noise floor ([\d.]+)\)', text).group(1))
  # More data helps; the NNGP mean is far better than predicting 0 (mse ≈ 1 on
  # standardised targets) and cannot beat the noise.
  assert all(b < a for a, b in zip(mse, mse[1:])) and floor < mse[-1] < 0.2, mse
  assert len(re.findall(r'cg iterations \(\w+, N=\d+\): \d+', text)) >= 2


@pytest.mark.slow
def test_flax_model_kernel(tmp_path):
  pytest.importorskip('flax')
  text = run_example('flax_model_kernel', tmp_path)
  inf = dict(re.findall(r'^infinite (NNGP|NTK) test accuracy ([\d.]+)', text, re.M))
  # 100 training digits: these kernels reach ~0.95 on 200 test images (chance 0.1).
  assert float(inf['NNGP']) > 0.85 and float(inf['NTK']) > 0.85, inf
  assert re.search(r'using (JACOBIAN_CONTRACTION|NTK_VECTOR_PRODUCTS|STRUCTURED_DERIVATIVES)',
                   text)
  rows = re.findall(r'^width (\d+): alignment at init ([\d.]+), after training ([\d.]+), '
                    r'relative change ([\d.]+) \(uncentred [\d.]+\), train loss ([\d.]+), '
                    r'test accuracy ([\d.]+)', text, re.M)
  assert len(rows) == 3, text
  widths, align_0, align_t, change, train_loss, acc = (
      [float(r[i]) for r in rows] for i in range(6))
  assert widths == sorted(widths)
  # Centred alignment at init: measured 0.963 / 0.978 / 0.987 for widths 32-128,
  # its deficit shrinking with width (a few thousandths between seeds).
  assert all(a > 0.93 for a in align_0) and align_0[-1] > align_0[0], align_0
  assert all(a > 0.93 for a in align_t) and align_t[-1] > align_t[0], align_t
  # Relative change of the centred NTK: measured 0.61 / 0.27 / 0.19, 2-3 times
  # apart from the narrowest to the widest, ±15% between seeds.
  assert change[0] > change[1] > change[2] and change[2] < 0.6 * change[0], change
  slope = float(re.search(r'slope of relative change in width: (-?[\d.]+)', text).group(1))
  assert -1.5 < slope < -0.3, slope
  # All fit the training set (loss 0.045 at zero outputs); the widest generalises best.
  assert all(l < 0.035 for l in train_loss), train_loss
  assert acc[-1] > 0.7 and acc[-1] > acc[0], acc
