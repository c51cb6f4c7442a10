"""TrainCheckpointer.after_step without per-step host collectives (issue 18, item 3): with several processes the
SIGTERM flags are exchanged only every ``preemption_check_every`` steps (or orbax's ``reached_preemption`` says
so), ``stop_after`` stops every process at the same step without asking; one process asks nobody. The processes
are simulated: ``jax.process_count`` and ``multihost_utils.process_allgather`` are stubbed (the real 2-process run is
tests/test_train_lm_cli.py)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from unitok_jax.training.checkpoint import TrainCheckpointer


class _Manager:
    def __init__(self, preempt_at=None):
        self.saved, self.preempt_at = [], preempt_at

    def all_steps(self):
        return list(self.saved)

    def save(self, step, args=None, force=False):
        if force:
            self.saved.append(step)
        return force

    def reached_preemption(self, step):
        return self.preempt_at is not None and step >= self.preempt_at

    def wait_until_finished(self):
        pass


class _Flag:
    def __init__(self):
        self.requested = False


def _checkpointer(every, manager):
    ck = object.__new__(TrainCheckpointer)
    ck.manager, ck.directory, ck.preemption_check_every, ck.host_collectives = manager, "/ckpt", every, 0
    return ck


@pytest.fixture
def processes(monkeypatch):
    """Two simulated processes; ``others`` is the SIGTERM flag of the other process."""
    state = {"calls": 0, "others": False}

    def gather(x, tiled=False):
        state["calls"] += 1
        return np.stack([np.asarray(x), np.array([state["others"]])])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    return state


def _run(ck, flag, steps, *, sigterm_at=None, stop_after=None, total=1000):
    for step in range(1, steps + 1):
        if sigterm_at is not None and step == sigterm_at:
            flag.requested = True
        if ck.after_step(step, {}, {}, preempt=flag, stop_after=stop_after, start=0, total=total,
                         say=lambda *a, **k: None):
            return step
    return None


def test_sigterm_in_another_process_stops_at_the_next_check(processes):
    ck = _checkpointer(10, _Manager())
    flag = _Flag()
    assert _run(ck, flag, 9) is None and processes["calls"] == 0  # no exchange between checks
    processes["others"] = True  # the other process got SIGTERM at step 9
    stopped = _run(ck, flag, 30)
    assert stopped == 10 and processes["calls"] == 1 and ck.manager.saved == [10]


def test_local_sigterm_is_exchanged_every_n_steps(processes):
    ck = _checkpointer(4, _Manager())
    stopped = _run(ck, _Flag(), 50, sigterm_at=5)
    assert stopped == 8 and processes["calls"] == 2  # checks at steps 4 and 8 only


def test_orbax_preemption_and_stop_after_need_no_exchange(processes):
    ck = _checkpointer(10, _Manager(preempt_at=3))
    assert _run(ck, _Flag(), 50) == 3 and processes["calls"] == 0
    ck = _checkpointer(10, _Manager())
    assert _run(ck, _Flag(), 50, stop_after=7) == 7 and processes["calls"] == 0 and ck.manager.saved == [7]


def test_one_process_checks_its_flag_every_step(monkeypatch):
    calls = []
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda *a, **k: calls.append(1))
    ck = _checkpointer(10, _Manager())
    assert _run(ck, _Flag(), 50, sigterm_at=3) == 3 and not calls
