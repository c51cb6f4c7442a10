"""The numerical-fault policy: skipped steps are reported with their number; N in a row abort the run."""
from __future__ import annotations

import pytest

from unitok_jax.training.guard import BadSteps, NonFiniteError


def test_bad_steps_reported_and_reset_by_a_good_step():
    msgs = []
    g = BadSteps(3, report=msgs.append)
    for step, flag in [(1, 0), (2, 1), (3, 1), (4, 0), (5, 1), (6, 1)]:
        g.add(step, flag)
    g.check()  # 2 in a row at most: no abort
    assert [m.split(":")[0] for m in msgs] == ["step 2", "step 3", "step 5", "step 6"]
    assert g.consecutive == 2 and g.total == 4
    g.add(7, 1)
    with pytest.raises(NonFiniteError, match="aborting at step 7: 3 consecutive"):
        g.check()


def test_bad_steps_limit_zero_never_aborts():
    g = BadSteps(0, report=lambda m: None)
    for s in range(50):
        g.add(s, 1)
    g.check()
    assert g.total == 50
