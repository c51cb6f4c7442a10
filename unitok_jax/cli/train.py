"""Training CLI (``unitok-train``, ``python -m unitok_jax.cli.train``, or the repository's ``train.py``).

  unitok-train --config configs/vae.py:tiny --workdir DIR [--config.key=value ...]

``--config`` is a config file ``PATH[:variant]``; a path that does not exist but names a packaged config
(``configs/vae.py``, ``lm.py``, ...) loads the package's own (:func:`unitok_jax.configs.resolve`), so the command
works from any folder after ``pip install``. The config names the stage: ``vae`` (the tokenizer; ``train.objective``
s0 or s1: :mod:`unitok_jax.training.vae_train`) or ``lm`` (the LM stage, and the tokenizer's unified stage s2:
:mod:`unitok_jax.training.lm_train`); both run in the one loop of :mod:`unitok_jax.training.loop`. A workdir that already holds a checkpoint resumes it exactly (params,
optimizer states, step, RNG and the data position). SIGTERM saves a checkpoint and exits cleanly. At the end the
inference params are exported to ``DIR/export`` (a checkpoint ``sample.py`` loads); ``python -m unitok_jax.export
DIR --step N`` exports any saved step.

Both stages run on one device mesh (``--config.mesh_preset`` or ``--config.mesh.*``; several processes when the
environment describes them, ``--config.distributed``): the train state is created in its shardings, the step is
one jit with in/out shardings and donated state, every process loads its rows of each global batch.

Exit status: 0 done (or stopped with a checkpoint), 2 a configuration or input problem found before training (the
message names it; no traceback), 3 too many consecutive non-finite steps (``train.max_bad_steps``).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

STAGES = ("vae", "lm")


def _define_flags() -> None:
    """The flags, defined on first use (importing this module defines none, so it never clashes with a host
    program's absl flags)."""
    from absl import flags
    from ml_collections import config_flags

    if "workdir" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py[:variant])",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints and metrics go (resumed if it holds a checkpoint)")
    flags.DEFINE_integer("stop_after", None, "stop (with a checkpoint) after this many steps in this run (testing)")
    flags.mark_flags_as_required(["config", "workdir"])


def _resolve_config(argv: list[str]) -> list[str]:
    """``--config PATH[:variant]`` / ``--config=PATH[:variant]`` with PATH resolved by
    :func:`unitok_jax.configs.resolve`; every other argument as it is."""
    from unitok_jax.configs import resolve

    out, i = list(argv), 1
    while i < len(out):
        if out[i] == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
            i += 1
        elif out[i].startswith("--config="):
            out[i] = "--config=" + resolve(out[i][len("--config="):])
        i += 1
    return out


def train(config, workdir: str, stop_after: Optional[int] = None) -> int:
    """Run the stage ``config.stage`` in ``workdir``; returns the exit status (errors printed, no traceback)."""
    from absl import logging

    from unitok_jax.training.guard import NonFiniteError, SetupError

    if config.stage not in STAGES:
        print(f"error: stage {config.stage!r} is not implemented yet (available: {sorted(STAGES)})", file=sys.stderr)
        return 2
    os.makedirs(workdir, exist_ok=True)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    from unitok_jax.training import loop

    try:
        return loop.run(loop.build_stage(config, workdir), config, workdir, stop_after)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (the arguments after the program name; default ``sys.argv[1:]``) and train; exits the process
    with the stage's status (absl's ``app.run``)."""
    from absl import app, flags

    _define_flags()
    args = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)

    def _main(_):
        return train(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.stop_after)

    app.run(_main, argv=_resolve_config(args))


if __name__ == "__main__":
    main()
