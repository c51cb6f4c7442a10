"""Training checkpoints: an orbax ``CheckpointManager`` holding the train state (params, optimizer state, step,
RNG) and the data iterator's position, saved asynchronously every N steps and on preemption (SIGTERM), keeping
the last K. Orbax writes each step under a temporary name and commits it atomically, so a process killed during a
save leaves the previous checkpoint restorable.

Restore takes an *abstract* target (``jax.ShapeDtypeStruct`` leaves, with shardings): the arrays come back in
those shardings, so a run can resume on a different mesh.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Preemption:
    """Turns SIGTERM (what schedulers send before preempting) into a flag the training loop polls, so it can save
    and exit cleanly instead of dying mid-step."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        del frame
        self.requested = True

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class TrainCheckpointer:
    """``save(step, state, data_state)`` every ``every_steps`` (or forced); ``restore(abstract_state)``."""

    def __init__(self, workdir: str, *, every_steps: int = 1000, keep: int = 3, async_save: bool = True,
                 preemption_check_every: int = 10):
        if every_steps < 1 or keep < 1 or preemption_check_every < 1:
            raise ValueError("every_steps, keep and preemption_check_every must be >= 1")
        self.preemption_check_every = int(preemption_check_every)
        self.host_collectives = 0  # SIGTERM flag exchanges between processes so far (multi-process runs only)
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Optional[dict] = None, *, force: bool = False) -> bool:
        """Save (asynchronously) if the policy says so or ``force``; returns whether a save started. A step that is
        already saved is not saved again."""
        if int(step) in self.manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Optional[tuple[int, Any, dict]]:
        """(step, state, data_state) of the latest (or given) checkpoint, or None when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return step, out["state"], dict(out["data"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def after_step(self, step: int, state: Any, data_state: dict, *, preempt: "Preemption", stop_after: Optional[int],
                   start: int, total: int, say=print) -> bool:
        """What both training loops do after each step: the periodic save, then -- on SIGTERM or once
        ``stop_after`` steps ran in this invocation -- a forced save, waited for, and a message. Returns True when
        the loop must stop (before ``total``).

        No host collective runs on an ordinary step. ``stop_after`` is the same number on every process, so every
        process stops at the same step without asking the others. With several processes a SIGTERM (which may reach
        only some of them) stops all of them at the same step through either

        * orbax's ``reached_preemption`` (jax's preemption sync manager: a local poll; it agrees on a step through
          the coordination service only when a preemption notice arrived), or
        * one exchange of the local SIGTERM flags every ``preemption_check_every`` steps (one asking stops all),
          for schedulers whose SIGTERM reaches this handler rather than jax's notifier.

        A single process checks its own flag every step (no exchange)."""
        self.save(step, state, data_state)
        stop = stop_after is not None and step - start >= stop_after
        if jax.process_count() == 1:
            stop = stop or preempt.requested
        elif not stop:
            stop = self.manager.reached_preemption(step)
            if not stop and step % self.preemption_check_every == 0:
                import numpy as np
                from jax.experimental import multihost_utils

                self.host_collectives += 1
                stop = bool(np.any(multihost_utils.process_allgather(np.array([preempt.requested]))))
        if not stop or step >= total:
            return False
        self.save(step, state, data_state, force=True)
        self.wait()
        reason = "stop_after" if stop_after is not None and step - start >= stop_after else "SIGTERM"
        say(f"\nstopped at step {step} ({reason}); "
            f"checkpoint saved in {self.directory}")
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with the current shardings) of a concrete tree: the restore target for the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
