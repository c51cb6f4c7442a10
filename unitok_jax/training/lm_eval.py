"""Held-out evaluation of the LM stage, every ``sample_every`` steps of :func:`unitok_jax.training.loop.run` (set
``data.heldout_manifest``: a JSONL of {id, audio, text} the run does not train on).

* **Held-out loss**: ``data.heldout_size`` records spread over the manifest, each as a TTS and as an ASR sequence
  of its posterior-mean latents (no noise), through the training loss with dropout off and a fixed flow key, so the
  numbers are comparable from one evaluation to the next: ``heldout/loss``, ``heldout/text_ce``,
  ``heldout/text_acc``, ``heldout/flow``, ``heldout/stop``. Any mesh, any number of processes.
* **Samples** (one process): the first ``sample_audio`` records transcribed by the model (compiled ASR loop; the
  transcripts in TensorBoard's text tab, their character error rate as ``heldout/asr_cer`` when ``jiwer`` is
  installed) and their texts spoken in the voice of the next record (compiled TTS loop; audio in TensorBoard).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from unitok_jax.training.guard import SetupError


class HeldOut:
    """The held-out batch and its jitted loss, built once (at the first evaluation) from the stage and its state."""

    def __init__(self, stage, state):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from unitok_jax import shapes, vae
        from unitok_jax import text as text_lib
        from unitok_jax.audio import AudioError, load_audio
        from unitok_jax.data.manifest import read_manifest, spread_order
        from unitok_jax.training import lm_data
        from unitok_jax.training.lm_step import lm_loss
        from unitok_jax.training.lm_train import fit_examples

        config, cfg, tok = stage.config, stage.cfg, stage.tok
        self.stage = stage
        path = config.data.heldout_manifest
        if not os.path.isfile(path):
            raise SetupError(f"data.heldout_manifest {path} does not exist")
        records = read_manifest(path, require_text=True).records
        p, sr = cfg.patch_size, cfg.vae.sample_rate
        limit = int(config.data.max_seconds * sr)
        self.ids, self.texts, self.waves = [], [], []
        for i in spread_order(len(records), int(config.data.heldout_size)):
            if len(self.waves) == int(config.data.heldout_size):
                break
            try:
                w = load_audio(records[i]["audio"], sr)[:limit]
            except AudioError:
                continue
            if len(w) >= p * cfg.vae.hop:
                self.ids.append(str(records[i].get("id", i)))
                self.texts.append(str(records[i]["text"]).strip())
                self.waves.append(w)
        if not self.waves:
            raise SetupError(f"data.heldout_manifest {path}: no readable record of at least one patch")

        # posterior means of the frozen encoder: all clips in one padded batch, on one device (they are few)
        audio = jax.device_put(stage.host_vae(state), jax.local_devices()[0])
        waves, lengths = shapes.pad_waves(self.waves, cfg.vae.hop)
        enc = jax.jit(lambda prm, w, n: vae.encode(prm, cfg.vae, w, n, sample=False))(audio, waves, lengths)
        means, frames = np.asarray(enc.mean), np.asarray(enc.frame_num)
        examples, where = [], []
        for k, txt in enumerate(self.texts):
            lat = means[k, : int(frames[k])]
            examples += [lm_data.tts_example(tok, txt, lat, p),
                         lm_data.asr_example(tok, lat, txt, text_lib.detect_lang(txt), p)]
            where += [2 * k, 2 * k + 1]
        examples, _, unfit = fit_examples(config, examples, where)
        if not examples:
            raise SetupError(f"data.heldout_manifest {path}: no record fits data.seq_len / data.max_patches / "
                             "train.text_positions")
        batch = lm_data.make_batch(examples, config.data.seq_len or None, config.data.max_patches or None,
                                   pad_id=tok.id("eos"))
        batch.pop("is_tts")
        rep = NamedSharding(stage.mesh, P())
        if stage.nproc == 1:
            self.batch = jax.device_put(batch, rep)
        else:  # every process holds the whole held-out batch
            self.batch = {k: jax.make_array_from_process_local_data(rep, v) for k, v in batch.items()}
        t = config.train
        weights = dict(stop_weight=t.stop_weight, flow_weight=t.flow_weight, text_weight=t.text_weight)
        key = jax.random.key(config.seed + 1)

        def loss(params, batch):
            total, m = lm_loss(params, cfg, batch, key, deterministic=True,
                               text_positions=t.get("text_positions", 0), **weights)
            return {"heldout/loss": total, "heldout/text_ce": m["text_ce"], "heldout/text_acc": m["text_acc"],
                    "heldout/flow": m["flow"], "heldout/stop": m["stop"]}

        self.loss = jax.jit(loss, in_shardings=(stage.param_sh, rep), out_shardings=rep)
        stage.say(f"held-out evaluation: {len(examples)} sequences (TTS + ASR) of {len(self.waves)} clips from "
                  f"{path}" + (f" ({unfit} did not fit the fixed shapes)" if unfit else ""))
        self.samples = min(int(config.sample_audio), len(self.waves)) if stage.nproc == 1 else 0
        if int(config.sample_audio) and stage.nproc > 1:
            stage.say("held-out samples (TTS / ASR) run in single-process runs only; this run logs the held-out "
                      "loss")

    def __call__(self, step: int, state, writer) -> dict:
        out = {k: float(v) for k, v in jax.device_get(self.loss(state["params"], self.batch)).items()}
        if self.samples:
            out.update(self.sample(step, state, writer))
        return out

    def sample(self, step: int, state, writer) -> dict:
        """The first ``samples`` clips transcribed, and their texts spoken in the voice of the next clip."""
        from unitok_jax.api import UniAudio
        from unitok_jax.eval import metrics as em
        from unitok_jax.training.lm_train import with_training_options

        stage, n = self.stage, self.samples
        cfg = with_training_options(stage.config, stage.cfg, export=True)
        model = UniAudio(cfg, state["params"], stage.tok)
        longest = max(len(stage.tok.encode(t)) for t in self.texts[:n])
        transcripts = model.asr(self.waves[:n], max_new_tokens=2 * longest + 8)
        prompts = [self.waves[(i + 1) % len(self.waves)] for i in range(n)]
        speech = model.tts(self.texts[:n], prompts, seed=int(step))
        errors, chars = 0, 0
        for i in range(n):
            writer.text(step, f"samples/{i}/asr", f"reference: {self.texts[i]}\n\ntranscript: {transcripts[i]}")
            writer.audio(step, f"samples/{i}/tts", speech[i], cfg.vae.sample_rate)
            try:
                r = em.error_rates(self.texts[i], transcripts[i])
            except em.EvalDependencyError:
                continue
            errors, chars = errors + r["char_errors"], chars + r["chars"]
        return {"heldout/asr_cer": errors / chars} if chars else {}
