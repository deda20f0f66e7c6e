"""The requirements pass: which moment blocks each value needs (DESIGN §5).

Before the kernel interpreter runs, a backward pass over the function's
equations (calls inlined by the walker) decides, per value, what of its
second moments the outputs need:

* `BATCH_DIAGONAL`: only each input with itself (per-input statistics, such
  as the channel means of LayerNorm);
* `PIXEL_DIAGONAL`: pairs of inputs, at equal spatial positions only (layers
  before a Flatten or dense readout: `N² d` entries instead of `N² d²`);
* `FULL`: pairs of inputs at every pair of positions (an output that keeps
  spatial axes, and every value it is computed from; the operand of a map
  that mixes positions, such as pooling).

(`infwidth.domain.needs.Need`.)

A value needs the most that any of its uses needs; a primitive's registered
`requirement` fact says what its operands need (pooling: full blocks). The
kernel computation
tracks pixel diagonals unless an output needs full blocks; the moment engine
then computes full blocks only below maps that mix positions, the values this
pass marks `FULL` under a pixel-diagonal output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

import numpy as np

from infwidth.domain.needs import Need
from infwidth.interpreters.compat import CALL_PRIMITIVES
from infwidth.interpreters.flat_program import Lit, flatten
from infwidth.rules import registry


def output_need(shape: Sequence[int]) -> Need:
  """An output `(N, C)` needs pixel diagonals (there are none: one entry per
  pair); one with more axes of size > 1 (spatial axes) needs full blocks."""
  extra = [n for n in tuple(shape)[1:-1] if n != 1]
  return Need.FULL if extra else Need.PIXEL_DIAGONAL


def _operand_need(op, out_need: Need) -> Need:
  """What an operand of `op` needs when its outputs need `out_need`: the
  primitive's registered `requirement` fact, else the same."""
  rule = registry.fact(op.prim, 'requirement')
  return out_need if rule is None else rule(op.eqn, out_need)


@dataclasses.dataclass
class Requirements:
  """The needs of a function's values (ids as in `flat_program.flatten`)."""
  needs: Dict[int, Need]
  outputs: List[Need]

  @property
  def pixel_diagonal(self) -> bool:
    """Whether the kernel computation may track only equal spatial positions."""
    return all(n < Need.FULL for n in self.outputs)

  def full_blocks(self) -> List[int]:
    """Ids of the values that need full blocks."""
    return sorted(i for i, n in self.needs.items() if n == Need.FULL)


def requirements(closed) -> Requirements:
  """The requirements of the values of `closed`, by a backward pass.

  Each output needs what `output_need` says of its shape; a value needs the
  most any of its uses needs.
  """
  prog = flatten(closed, inline=CALL_PRIMITIVES)
  outputs = [output_need(np.shape(a.val) if isinstance(a, Lit) else prog.avals[a].shape)
             for a in prog.out_atoms]
  needs: Dict[int, Need] = {}

  def raise_need(atom: Any, need: Need):
    if not isinstance(atom, Lit) and needs.get(atom, -1) < need:
      needs[atom] = need

  for atom, need in zip(prog.out_atoms, outputs):
    raise_need(atom, need)
  for op in reversed(prog.ops):
    outs = [needs[o] for o in op.outs if o in needs]
    if outs:  # else nothing an output needs
      for atom in op.ins:
        raise_need(atom, _operand_need(op, max(outs)))
  return Requirements(needs, outputs)
