"""The one training loop of every stage (the VAE's S0 / S1, the LM stage and S2), and inference exports of any
checkpoint (:func:`export_checkpoint`, ``python -m unitok_jax.export``).

A stage (:class:`Stage`: :class:`unitok_jax.training.vae_train.VAEStage`,
:class:`unitok_jax.training.lm_train.LMStage`) owns its model, mesh, sharded state, data and held-out evaluation;
:func:`run` owns what they share:

* the train state: created in its shardings on a fresh workdir, else restored (with the data position) from the
  latest orbax checkpoint, in the shardings of this run's mesh;
* the steps: the stage hands over ``(compiled step, global batch)``; the loop runs it, counts non-finite steps
  (:class:`unitok_jax.training.guard.BadSteps`) and the work done (seconds of audio, tokens);
* monitoring: a tqdm bar; every ``log_every`` steps the step's metrics, throughput, MFU (where the device's peak
  is known; the matmul FLOPs are traced once per step program and batch shape), ``data_s`` (seconds per step the
  host spent building batches; the device waits for at most that, less what async dispatch overlaps) and
  ``compiled_programs`` (step programs x batch shapes run so far, each a compilation) to ``metrics.jsonl`` and
  TensorBoard; every ``sample_every`` steps the stage's held-out evaluation (the throughput clock stops meanwhile);
* checkpoints every ``checkpoint.every_steps`` and on SIGTERM / ``stop_after`` (:class:`TrainCheckpointer`), and at
  the end an inference export in ``DIR/export`` (the stage's :meth:`Stage.export`).

The config of the last run is kept in ``DIR/config.json``, so ``python -m unitok_jax.export DIR --step N`` can turn
any checkpoint of the run into an export without the command line that made it.
"""
from __future__ import annotations

import abc
import json
import os
import sys
import time
from typing import Any, NamedTuple, Optional

from unitok_jax.training.guard import SetupError

CONFIG_FILE = "config.json"


class Step(NamedTuple):
    """What a stage hands the loop for one step."""

    fn: Any  # a compiled step ``(state, batch) -> (state, metrics)`` (:func:`sharded.jit_step`; ``.raw`` traced)
    batch: dict  # the global batch
    units: float  # work in this step, all processes together (seconds of audio, tokens)
    info: dict  # extra values for this step's log line


class Stage(abc.ABC):
    """A training stage, as :func:`run` and :func:`export_checkpoint` use it (an abstract base class). A subclass sets
    the attributes in its constructor (built with ``data=False`` for an export: model, mesh and abstract state only)
    and implements the abstract methods."""

    name = "stage"  # the progress bar's "train NAME"
    units = "units_per_s"  # the throughput metric's name
    skipped_metric = "skipped"  # the step metric that flags a non-finite (skipped) step
    compute_dtype = "float32"  # for the device's peak FLOP/s (MFU)
    mesh = None
    rules: tuple = ()
    state_abs: Any = None  # abstract train state (``jax.eval_shape`` of the init)
    state_sh: Any = None  # its shardings on ``mesh``
    bad_records = 0  # records / rows skipped so far (kept in the checkpoint's data state)
    sample_every = 0  # held-out evaluation every this many steps (and at the end); 0 = never

    def __init__(self, config, workdir: str, *, data: bool = True):
        """What every stage starts with; a training run (``data``) joins the processes of a multi-host run first."""
        import jax

        from unitok_jax.training import sharded

        if data:
            sharded.maybe_initialize_distributed(config.distributed)
        self.config, self.workdir = config, workdir
        self.nproc = jax.process_count()

    def say(self, *args, **kwargs) -> None:
        """print on process 0 only."""
        import jax

        if jax.process_index() == 0:
            print(*args, **kwargs)

    def read_manifest(self, key: str, fields: str, **kwargs) -> list:
        """The records of the manifest at ``config.data.<key>`` (``fields``: what a record holds, for the message);
        unreadable lines are reported and skipped; SetupError when it is unset, missing or empty."""
        from unitok_jax.data.manifest import read_manifest

        path = self.config.data.get(key)
        if not path:
            raise SetupError(f"set --config.data.{key}=PATH (a JSONL of {fields})")
        if not os.path.isfile(path):
            raise SetupError(f"{key.replace('_', ' ')} {path} does not exist")
        manifest = read_manifest(path, **kwargs)
        for e in manifest.errors:
            self.say(f"skipped {e}", file=sys.stderr)
        if not manifest.records:
            raise SetupError(f"{path} has no usable records")
        return manifest.records

    @abc.abstractmethod
    def init_state(self):
        """The initial train state, created in ``state_sh`` (a fresh workdir)."""

    def begin(self, state) -> None:
        """Called once the train state exists (created or restored), before the first step."""

    @abc.abstractmethod
    def data_state(self) -> dict:
        """The data position (JSON), saved with each checkpoint."""

    @abc.abstractmethod
    def set_data_state(self, saved: dict) -> None:
        """Move the data iterator to a position :meth:`data_state` returned (a resumed run)."""

    @abc.abstractmethod
    def next_step(self, step: int) -> Step:
        """The program and global batch of step ``step`` (0-based: the number of steps done)."""

    def evaluate(self, step: int, state, writer) -> dict:
        """Held-out metrics at ``step`` (may also log audio / images / text through ``writer``)."""
        return {}

    def postfix(self, metrics: dict) -> dict:
        """The progress bar's fields of a logged step."""
        return {}

    @abc.abstractmethod
    def export(self, state, out: str, step: int) -> str:
        """Write the inference export of ``state`` to ``out`` (process 0 writes); returns a line for the user."""


def save_config(config, workdir: str) -> None:
    """``DIR/config.json``: the run's config (process 0 writes, atomically)."""
    import jax

    from unitok_jax.io import write_json

    if jax.process_index() == 0:
        write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json_best_effort()))


def load_config(workdir: str):
    """The config a run saved in ``DIR/config.json`` (a ConfigDict); ``FileNotFoundError`` names what is missing."""
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a train.py workdir (made by a run of this "
                                "version or later)?")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def run(stage: Stage, config, workdir: str, stop_after: Optional[int] = None) -> int:
    """Train (or resume) ``stage`` in ``workdir`` up to ``config.train.steps``; returns 0 (also when stopped early
    with a checkpoint). Raises :class:`unitok_jax.training.guard.NonFiniteError` after ``train.max_bad_steps``
    consecutive non-finite steps."""
    import jax
    from tqdm import tqdm

    from unitok_jax import sharding as shd
    from unitok_jax.training import sharded
    from unitok_jax.training.checkpoint import Preemption, TrainCheckpointer
    from unitok_jax.training.guard import BadSteps
    from unitok_jax.training.monitor import MetricWriter, Throughput, matmul_flops, mfu, peak_flops_per_device

    pid = jax.process_index()
    save_config(config, workdir)
    ckpt = TrainCheckpointer(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                             preemption_check_every=config.checkpoint.get("preemption_check_every", 10))
    state = stage.init_state() if ckpt.latest_step() is None else None
    restored = ckpt.restore(sharded.abstract_state(stage.state_abs, stage.state_sh))
    if restored is not None:
        step0, state, saved = restored
        stage.set_data_state(saved)
        stage.say(f"resumed {workdir} at step {step0}")
    stage.begin(state)

    writer = MetricWriter(workdir, tensorboard=config.tensorboard)
    paused = [0.0]  # seconds spent in held-out evaluations: not training time
    thr = Throughput(skip=1, clock=lambda: time.perf_counter() - paused[0])  # the first interval compiles
    peak = peak_flops_per_device(jax.devices()[0], stage.compute_dtype)
    flops: dict = {}  # (step program, batch shapes) -> global matmul FLOPs of one step (traced once each)
    programs: set = set()  # the (step program, batch shapes) pairs run so far: each one compiled once
    preempt = Preemption()
    start = step = int(state["step"])
    total = int(config.train.steps)
    bar = tqdm(total=total, initial=start, desc=f"train {stage.name}", unit="step", disable=pid != 0)
    interval_units, interval_steps, interval_data = 0.0, 0, 0.0
    guard = BadSteps(config.train.max_bad_steps, report=lambda msg: pid == 0 and print(msg, file=sys.stderr))
    sample_every = int(stage.sample_every or 0)
    try:
        while step < total:
            t_data = time.perf_counter()
            todo = stage.next_step(step)
            interval_data += time.perf_counter() - t_data
            sig = (id(todo.fn), tuple((k, v.shape) for k, v in sorted(todo.batch.items())))
            programs.add(sig)
            if peak is not None and sig not in flops:
                with shd.use_sharding(stage.mesh, stage.rules):
                    flops[sig] = float(matmul_flops(todo.fn.raw, state, todo.batch))
            state, metrics = todo.fn(state, todo.batch)
            step += 1
            guard.add(step, metrics[stage.skipped_metric])
            interval_units += todo.units
            interval_steps += 1
            held = {}
            if sample_every and (step % sample_every == 0 or step == total):
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                held = stage.evaluate(step, state, writer)
                paused[0] += time.perf_counter() - t0
            if step % config.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                guard.check()
                t = thr.update(units=interval_units, steps=interval_steps)
                m.update(step=step, bad_records=stage.bad_records, data_s=interval_data / interval_steps,
                         compiled_programs=len(programs), **todo.info)
                interval_units, interval_steps, interval_data = 0.0, 0, 0.0
                if t is not None:
                    m.update(step_s=t["step_s"], **{stage.units: t["units_per_s"]})
                    u = mfu(flops.get(sig), t["step_s"], jax.device_count(), peak)
                    if u is not None:
                        m["mfu"] = u
                m.update(held)
                writer.scalars(step, m)
                bar.set_postfix(**stage.postfix(m), step_s=f"{m['step_s']:.3f}" if "step_s" in m else "n/a",
                                **({"mfu": f"{m['mfu']:.1%}"} if "mfu" in m else {}))
            elif held:
                writer.scalars(step, held)
            if held:
                writer.flush()
            bar.update(1)
            if ckpt.after_step(step, state, stage.data_state(), preempt=preempt, stop_after=stop_after,
                               start=start, total=total, say=stage.say):
                return 0
        ckpt.save(step, state, stage.data_state(), force=True)
        ckpt.wait()
    finally:
        bar.close()
        preempt.restore()
        ckpt.close()
        writer.close()
    stage.say(f"done: {step} steps ({stage.bad_records} records skipped); checkpoints in {ckpt.directory}")
    stage.say(stage.export(state, os.path.join(workdir, "export"), step))
    return 0


def export_checkpoint(workdir: str, step: Optional[int] = None, out: Optional[str] = None) -> str:
    """Turn checkpoint ``step`` (default: the latest) of the train.py run in ``workdir`` into an inference export
    (the format ``sample.py`` and :meth:`unitok_jax.api.UniAudio.load` read) at ``out`` (default
    ``DIR/export_step{N}``; an existing folder is replaced). The stage is rebuilt from ``DIR/config.json`` without
    its data; the state is restored on the run's mesh when this host has its devices, else on one device. Returns
    the export's path. ``ValueError`` for a workdir without that checkpoint."""
    from unitok_jax.training import sharded
    from unitok_jax.training.checkpoint import TrainCheckpointer

    config = load_config(workdir)
    ckpt = TrainCheckpointer(workdir, every_steps=1, keep=1 << 30)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ValueError(f"{workdir} holds no checkpoint (checkpoints/ is empty)")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise ValueError(f"{workdir} has no checkpoint at step {step}; it has steps {sorted(steps)}")
        stage = build_stage(config, workdir, data=False)
        restored = ckpt.restore(sharded.abstract_state(stage.state_abs, stage.state_sh), step)
    finally:
        ckpt.close()
    _, state, _ = restored
    out = out or os.path.join(workdir, f"export_step{step}")
    stage.say(stage.export(state, out, step))
    return out


def stage_mesh(sizes: dict, *, data: bool = True):
    """The run's mesh of axis ``sizes``. ``data=False`` (an export): when this host lacks the run's devices, a
    mesh of one device instead (the state is then restored whole on it)."""
    import jax

    from unitok_jax import sharding as shd

    try:
        return shd.make_mesh({"mesh": sizes})
    except ValueError as e:
        if data:
            raise SetupError(str(e)) from None
        return shd.make_mesh({"mesh": {a: 1 for a in sizes}}, devices=jax.devices()[:1])


def build_stage(config, workdir: str, *, data: bool = True) -> Stage:
    """The stage ``config.stage`` names (``data=False``: model, mesh and abstract state only, for an export)."""
    if config.stage == "vae":
        from unitok_jax.training.vae_train import VAEStage

        return VAEStage(config, workdir, data=data)
    if config.stage == "lm":
        from unitok_jax.training.lm_train import LMStage

        return LMStage(config, workdir, data=data)
    raise SetupError(f"stage {config.stage!r} is not implemented (available: 'vae', 'lm')")
