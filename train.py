#!/usr/bin/env python
"""Training CLI.

  python train.py --config configs/vae.py:tiny --workdir DIR [--config.key=value ...]

The config names the stage. Implemented: ``vae`` (tokenizer stage S0: mel + adversarial + feature matching + KL,
alternating generator / discriminator updates). A workdir that already holds a checkpoint resumes it exactly
(params, optimizer states, step, RNG and the data position). SIGTERM saves a checkpoint and exits cleanly.
Metrics go to the console (progress bar) and to ``DIR/metrics.jsonl``; at the end the inference params are
exported to ``DIR/export`` (a checkpoint ``sample.py`` loads).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/<name>.py[:variant])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints and metrics go (resumed if it holds a checkpoint)")
flags.DEFINE_integer("stop_after", None, "stop (with a checkpoint) after this many steps in this run (testing)")
flags.mark_flags_as_required(["config", "workdir"])


def train_vae(config, workdir: str, stop_after=None) -> int:
    import jax
    from tqdm import tqdm

    from unitok_jax import vae
    from unitok_jax.convert import Checkpoint, save
    from unitok_jax.data.manifest import read_manifest
    from unitok_jax.data.pipeline import vae_batches
    from unitok_jax.training.checkpoint import Preemption, TrainCheckpointer, abstract_like
    from unitok_jax.training.discriminators import DiscConfig
    from unitok_jax.training.vae_step import OptConfig, VAETrainConfig, init_vae_train_state, vae_train_step

    if not config.data.manifest:
        print("error: set --config.data.manifest=PATH (a JSONL of {id, audio, speaker})", file=sys.stderr)
        return 2
    manifest = read_manifest(config.data.manifest, require_text=False)
    for e in manifest.errors:
        print(f"skipped {e}", file=sys.stderr)
    if not manifest.records:
        print(f"error: {config.data.manifest} has no usable records", file=sys.stderr)
        return 2
    vcfg = vae.VAEConfig.from_reference(config.vae.to_dict())
    tcfg = VAETrainConfig(vae=vcfg, gan_loss=config.train.gan_loss, noise_tau=config.train.noise_tau,
                          adv_start_step=config.train.adv_start_step)
    dcfg = DiscConfig.tiny() if config.train.tiny_discriminators else DiscConfig()
    ocfg = OptConfig(lr=config.train.lr)
    key = jax.random.key(config.seed)
    k_init, k_state = jax.random.split(key)
    state = init_vae_train_state(tcfg, vae.init_params(vcfg, k_init), dcfg, ocfg, k_state)
    data = vae_batches(manifest.records, batch_size=config.data.batch_size, crop_seconds=config.data.crop_seconds,
                       seed=config.seed)
    it = iter(data)
    ckpt = TrainCheckpointer(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep)
    restored = ckpt.restore(abstract_like(state))
    if restored is not None:
        step0, state, data_state = restored
        it.set_state(data_state)
        print(f"resumed {workdir} at step {step0}")
    step_fn = jax.jit(vae_train_step, static_argnums=(2, 3, 4), donate_argnums=0)
    preempt = Preemption()
    start = int(state["step"])
    total = config.train.steps
    log_path = os.path.join(workdir, "metrics.jsonl")
    bar = tqdm(total=total, initial=start, desc="train vae", unit="step")
    bad_records, t_last, audio_s = 0, time.perf_counter(), 0.0
    step = start
    try:
        while step < total:
            batch = next(it)
            bad_records += int((~batch["ok"]).sum())
            state, metrics = step_fn(state, {"wave": batch["wave"], "lengths": batch["lengths"]}, tcfg, dcfg, ocfg)
            step += 1
            audio_s += float(batch["lengths"].sum()) / vcfg.sample_rate
            if step % config.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t_last
                m.update(step=step, bad_records=bad_records, audio_s_per_s=audio_s / max(dt, 1e-9))
                t_last, audio_s = time.perf_counter(), 0.0
                with open(log_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                bar.set_postfix(loss_g=f"{m['loss_g']:.3f}", mel=f"{m['mel']:.3f}", audio_s=f"{m['audio_s_per_s']:.1f}")
            bar.update(1)
            ckpt.save(step, state, it.get_state())
            if preempt.requested or (stop_after is not None and step - start >= stop_after):
                ckpt.save(step, state, it.get_state(), force=True)
                ckpt.wait()
                print(f"\nstopped at step {step} ({'SIGTERM' if preempt.requested else 'stop_after'}); "
                      f"checkpoint saved in {ckpt.directory}")
                return 0
        ckpt.save(step, state, it.get_state(), force=True)
        ckpt.wait()
    finally:
        bar.close()
        preempt.restore()
        ckpt.close()
    export = os.path.join(workdir, "export")
    save(Checkpoint({"vae": vcfg}, {"vae": jax.device_get(state["gen_params"])}), export, overwrite=True)
    print(f"done: {step} steps; checkpoints in {ckpt.directory}; inference params in {export} "
          f"(python sample.py reconstruct --checkpoint {export} ...)")
    return 0


def train_lm(config, workdir: str, stop_after=None) -> int:
    from unitok_jax.training import lm_train

    return lm_train.run(config, workdir, stop_after)


STAGES = {"vae": train_vae, "lm": train_lm}


def main(argv):
    del argv
    config = flags.FLAGS.config
    if config.stage not in STAGES:
        print(f"error: stage {config.stage!r} is not implemented yet (available: {sorted(STAGES)})", file=sys.stderr)
        return 2
    os.makedirs(flags.FLAGS.workdir, exist_ok=True)
    return STAGES[config.stage](config, flags.FLAGS.workdir, flags.FLAGS.stop_after)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
