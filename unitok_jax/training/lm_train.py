"""The LM stage driver behind ``train.py --config configs/lm.py:...`` (:mod:`unitok_jax.cli.train`; spec §5.7,
§5.8, §7.2).

One loop, any mesh, any number of processes:

1. the model config from ``config.model.bailingmm`` (the VAE part from the VAE checkpoint when one is given), the
   text tokenizer (a folder, or a BPE trained on the manifest's texts and kept in the workdir);
2. one mesh (:mod:`unitok_jax.sharding`); the train state ``{step, params, opt_state, rng, skipped}`` created
   directly in its shardings (:mod:`unitok_jax.training.sharded`); the step is one ``jax.jit`` with in/out
   shardings and donated state (:func:`unitok_jax.training.lm_step.make_lm_train_step`);
3. data: every process loads its rows of each global batch (:mod:`unitok_jax.data.lm_pipeline`); the frozen VAE's
   posterior comes from the latent cache or is computed on the fly; each row becomes a TTS or an ASR sequence
   (:mod:`unitok_jax.training.lm_data`) with a per-(step, row) RNG, so what a row trains on does not depend on how
   many processes share the batch;
4. orbax checkpoints every N steps and on SIGTERM (with the data position), resume, metrics (console, JSONL,
   TensorBoard), export of the inference params + tokenizer for ``sample.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax import text as text_lib
from unitok_jax.model import UniAudioConfig
from unitok_jax.training import lm_data
from unitok_jax.training.guard import NonFiniteError, SetupError  # noqa: F401  (raised by run)


# ------------------------------------------------------------------------------------------------ config / setup


def model_config(config, vae_cfg=None, vocab_size: Optional[int] = None) -> UniAudioConfig:
    """UniAudioConfig of an LM-stage config; ``vae_cfg`` (a VAEConfig) replaces the VAE part, ``vocab_size``
    the LLM vocabulary (a trained tokenizer's size)."""
    conf = config.model.bailingmm.to_dict() if hasattr(config.model.bailingmm, "to_dict") else dict(
        config.model.bailingmm)
    conf = json.loads(json.dumps(conf))  # plain, deep-copied
    if vocab_size is not None:
        conf["llm_config"]["vocab_size"] = int(vocab_size)
    dtype = config.model.dtype
    cfg = UniAudioConfig.from_bailingmm(conf, moe_impl=config.model.moe_impl, dtype=dtype)
    flow = dataclasses.replace(cfg.flow, dtype=dtype)
    if vae_cfg is not None:
        cfg = dataclasses.replace(cfg, vae=vae_cfg, heads=dataclasses.replace(cfg.heads, semantic_dim=vae_cfg.unified_dim))
        flow = dataclasses.replace(flow, z_channels=vae_cfg.latent_dim)
    return dataclasses.replace(cfg, flow=flow)


def with_training_options(config, cfg: UniAudioConfig, *, export: bool = False) -> UniAudioConfig:
    """``cfg`` with the LLM's ``model.remat`` and ``model.attention`` of the config (``export``: reset to the
    defaults, which an export for sampling should carry)."""
    attention = config.model.get("attention", "auto")
    if attention not in ("auto", "xla", "cudnn"):
        raise SetupError(f"model.attention={attention!r}: choose 'auto', 'xla' or 'cudnn'")
    remat = False if export else bool(config.model.get("remat", False))
    impl = None if export or attention == "auto" else attention
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, remat=remat, attention_impl=impl))


def tokenizer(config, texts, workdir: str) -> text_lib.TextTokenizer:
    """The configured tokenizer folder; else the one saved in ``workdir/tokenizer`` by an earlier run; else a BPE
    trained on ``texts`` (then saved there by process 0, so a resumed run keeps its ids)."""
    if config.tokenizer.path:
        return text_lib.TextTokenizer.from_dir(config.tokenizer.path)
    folder = os.path.join(workdir, "tokenizer")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return text_lib.TextTokenizer.from_dir(folder)
    tok = text_lib.train_tokenizer(texts, config.tokenizer.vocab_size)
    if jax.process_index() == 0:
        tok.save(folder)
    return tok


def unified_stage(config) -> bool:
    """Whether the config runs the tokenizer's unified stage S2 (``train.objective=s2``) rather than the LLM."""
    objective = config.train.get("objective", "lm")
    if objective not in ("lm", "s2"):
        raise SetupError(f"train.objective={objective!r} is not 'lm' or 's2'")
    return objective == "s2"


def optimizer(config, params):
    from unitok_jax.training import lm_step

    t = config.train
    base = lm_step.adamw(t.lr, weight_decay=t.weight_decay, clip_norm=t.clip_norm or None,
                         warmup_steps=t.warmup_steps)
    return lm_step.masked_optimizer(params, base, train_semantic=t.train_semantic,
                                    unified_stage=unified_stage(config))


def step_function(config, cfg, opt):
    from unitok_jax.training import lm_step

    t = config.train
    if unified_stage(config):  # S2: align_weight * ASR CE through the frozen LLM + mel_weight * full-path mel
        weights = dict(text_weight=t.align_weight, flow_weight=0.0, stop_weight=0.0, aux_weight=0.0, z_weight=0.0,
                       mel_weight=t.mel_weight)
    else:
        weights = dict(stop_weight=t.stop_weight, flow_weight=t.flow_weight, text_weight=t.text_weight,
                       aux_weight=t.aux_weight, z_weight=t.z_weight)
    return lm_step.make_lm_train_step(cfg, opt, train_semantic=t.train_semantic, accum_steps=t.accum_steps,
                                      unified_stage=unified_stage(config),
                                      text_positions=t.get("text_positions", 0), **weights)


# ------------------------------------------------------------------------------------------------ batches


def examples_from_rows(rows: dict, mean: np.ndarray, std: np.ndarray, frames: np.ndarray,
                       tok: text_lib.TextTokenizer, patch_size: int, *, seed: int, step: int,
                       tts_fraction: float) -> tuple[list, list[int], int]:
    """Examples of this process's rows: row r (global index ``rows["row"][k]``) samples its latents
    (mean + std * eps) and its task (TTS with probability ``tts_fraction``, else ASR) from an RNG seeded by
    (seed, step, r). Returns (examples, local positions they belong at, number of rows skipped: unreadable, shorter
    than a patch, or without text)."""
    examples, where, skipped = [], [], 0
    for k in range(len(rows["row"])):
        n = int(frames[k])
        txt = str(rows["text"][k]).strip()
        if not rows["ok"][k] or n < patch_size or not txt:
            skipped += 1
            continue
        rng = np.random.default_rng([seed, step, int(rows["row"][k])])
        is_tts = rng.random() < tts_fraction
        lat = mean[k, :n] + std[k, :n] * rng.standard_normal(mean[k, :n].shape).astype(np.float32)
        if is_tts:
            examples.append(lm_data.tts_example(tok, txt, lat, patch_size))
        else:
            examples.append(lm_data.asr_example(tok, lat, txt, text_lib.detect_lang(txt), patch_size))
        where.append(k)
    return examples, where, skipped


def edit_examples_from_rows(rows: dict, src: tuple, tgt: tuple, tok: text_lib.TextTokenizer, patch_size: int, *,
                            seed: int, step: int) -> tuple[list, list[int], int]:
    """Edit examples (:func:`lm_data.edit_example`) of this process's rows of an edit batch: ``src`` / ``tgt`` are
    (mean, std, frames) of the source and target speech; each row samples both latents from an RNG seeded by
    (seed, step, row). Semantic pairs (a ``target_markup``) get the ``<cot_text>`` chain, acoustic ones go straight
    to ``<gen_audio>``."""
    examples, where, skipped = [], [], 0
    for k in range(len(rows["row"])):
        ns, nt = int(src[2][k]), int(tgt[2][k])
        instruction = rows["instruction"][k]
        if not rows["ok"][k] or min(ns, nt) < patch_size or not instruction:
            skipped += 1
            continue
        rng = np.random.default_rng([seed, step, int(rows["row"][k])])
        lat = [m[k, :n] + s[k, :n] * rng.standard_normal(m[k, :n].shape).astype(np.float32)
               for (m, s, _), n in ((src, ns), (tgt, nt))]
        markup = rows["target_markup"][k]
        examples.append(lm_data.edit_example(tok, lat[0], str(instruction), lat[1], markup or None, patch_size))
        where.append(k)
    return examples, where, skipped


def place(examples: list, where: list[int], rows: int, max_len: int, max_patches: int, pad_id: int,
          latent_dim: int, patch_size: int) -> dict:
    """``make_batch`` of the examples with example j at local row ``where[j]`` (other rows all-invalid)."""
    if not examples:  # a batch with nothing usable: all rows invalid (the step then changes nothing)
        dummy = {"task": "asr", "input_ids": np.zeros(1, np.int32), "audio_patch_mask": np.zeros(1, bool),
                 "audio_gate": np.zeros(1, bool), "text_labels": np.full(1, lm_data.IGNORE, np.int32),
                 "latents": np.zeros((patch_size, latent_dim), np.float32), "patch_start": 0, "num_patches": 1,
                 "gen_patches": 0, "patch_cond_index": np.zeros(1, np.int32)}
        b = lm_data.make_batch([dummy], max_len, max_patches, batch_size=rows, pad_id=pad_id)
        b["valid"][:] = False
        b["latent_valid"][:] = False
        return b
    b = lm_data.make_batch(examples, max_len, max_patches, batch_size=rows, pad_id=pad_id)
    order = list(where) + [k for k in range(rows) if k not in set(where)]
    inv = np.argsort(order)
    return {k: v[inv] for k, v in b.items()}


def row_waves(rows: dict, where: list[int], latent_valid: np.ndarray, length: int, hop: int) -> dict:
    """Stage S2: ``{"wave" [B, length], "wave_lengths" [B]}`` for a placed batch: row k's audio cut to the frames its
    example kept (whole patches, ``latent_valid``); rows without an example get length 0."""
    b = len(latent_valid)
    wave = np.zeros((b, length), np.float32)
    lengths = np.zeros((b,), np.int32)
    for k in where:
        n = min(int(rows["lengths"][k]), int(np.sum(latent_valid[k])) * hop, length)
        wave[k, :n] = rows["wave"][k, :n]
        lengths[k] = n
    return {"wave": wave, "wave_lengths": lengths}


def row_sizes(records: list, tok: text_lib.TextTokenizer, patch_size: int, *, edit: bool = False) -> list[int]:
    """Per record, the tokens of its longest possible training sequence besides its audio patches (the larger of
    its TTS and ASR sequences; an edit record's edit sequence): with the patches of the batch's bucket, an upper
    bound of any example the record can become. Records without text count 0 (they are skipped)."""
    dummy = np.zeros((patch_size, 1), np.float32)
    sizes = []
    for r in records:
        txt = str(r.get("text") or "").strip()
        if edit:
            instruction = r.get("instruction")
            if not instruction:
                sizes.append(0)
                continue
            e = lm_data.edit_example(tok, dummy, str(instruction), dummy, r.get("target_markup") or None, patch_size)
            sizes.append(len(e["input_ids"]) - e["num_patches"])
        elif not txt:
            sizes.append(0)
        else:
            tts = lm_data.tts_example(tok, txt, dummy, patch_size)
            asr = lm_data.asr_example(tok, dummy, txt, text_lib.detect_lang(txt), patch_size)
            sizes.append(max(len(e["input_ids"]) - e["num_patches"] for e in (tts, asr)))
    return sizes


def planned_sizes(plan_size: int, patches: int, seq_len: int = 0, max_patches: int = 0) -> tuple[int, int]:
    """(max_len, max_patches) of a batch from the plan alone: the fixed sizes when given (> 0), else the buckets
    of ``plan_size`` (the global batch's largest :func:`row_sizes`) + ``patches`` (the most patches a row of the
    batch's bucket can have) and of ``patches``. Every process computes the same sizes without asking the others."""
    return (seq_len or lm_data.bucket(int(plan_size) + int(patches), lm_data.LEN_BUCKETS),
            max_patches or lm_data.bucket(max(int(patches), 1), lm_data.PATCH_BUCKETS))


# ------------------------------------------------------------------------------------------------ the loop


def run(config, workdir: str, stop_after: Optional[int] = None) -> int:
    """Train (or resume) the LM stage in ``workdir``; returns 0. Raises :class:`SetupError` for a configuration or
    input problem found before training starts, :class:`NonFiniteError` after ``train.max_bad_steps`` consecutive
    non-finite steps (:func:`unitok_jax.cli.train.main` prints either without a traceback)."""
    from tqdm import tqdm

    from unitok_jax import model as model_lib
    from unitok_jax import sharding as shd
    from unitok_jax import vae as vae_lib
    from unitok_jax.configs import lm as lm_configs
    from unitok_jax.convert import Checkpoint, load, save
    from unitok_jax.data.lm_pipeline import lm_batches
    from unitok_jax.data.manifest import read_manifest
    from unitok_jax.training import sharded
    from unitok_jax.training.checkpoint import Preemption, TrainCheckpointer
    from unitok_jax.training.guard import BadSteps
    from unitok_jax.training.lm_step import init_lm_state
    from unitok_jax.training.monitor import MetricWriter, Throughput, matmul_flops, mfu, peak_flops_per_device

    sharded.maybe_initialize_distributed(config.distributed)
    pid, nproc = jax.process_index(), jax.process_count()

    # ---- data + tokenizer + model config
    if not config.data.manifest:
        raise SetupError("set --config.data.manifest=PATH (a JSONL of {id, audio, text, speaker})")
    if not os.path.isfile(config.data.manifest):
        raise SetupError(f"manifest {config.data.manifest} does not exist")
    manifest = read_manifest(config.data.manifest, require_text=True, add_durations=True)
    if pid == 0:
        for e in manifest.errors:
            print(f"skipped {e}", file=sys.stderr)
    if not manifest.records:
        raise SetupError(f"{config.data.manifest} has no usable records")
    edits = None
    if config.data.edit_manifest:
        edits = read_manifest(config.data.edit_manifest, require_text=True, add_durations=True)
        if pid == 0:
            for e in edits.errors:
                print(f"skipped {e}", file=sys.stderr)
        if not edits.records:
            raise SetupError(f"{config.data.edit_manifest} has no usable records")
    s2 = unified_stage(config)
    if s2 and config.data.source != "audio":
        raise SetupError("train.objective=s2 decodes the waveform: it needs data.source=audio")
    if s2 and config.data.edit_manifest:
        raise SetupError("train.objective=s2 trains on ASR sequences only: unset data.edit_manifest")
    if s2 and not config.init.checkpoint and pid == 0:
        print("warning: train.objective=s2 without init.checkpoint aligns to a randomly initialised LLM",
              file=sys.stderr)
    tts_fraction = 0.0 if s2 else config.data.tts_fraction
    init_params, vae_cfg = None, None
    if config.init.checkpoint:
        ck = load(config.init.checkpoint)
        if "uniaudio" not in ck.configs:
            raise SetupError(f"{config.init.checkpoint} is not a full model checkpoint (use init.vae for a VAE)")
        cfg, init_params = ck.configs["uniaudio"], ck.params["uniaudio"]
        tok = (text_lib.TextTokenizer.from_dir(config.tokenizer.path or config.init.checkpoint))
    else:
        if config.init.vae:
            vae_cfg, vae_params = load(config.init.vae).vae()
        texts = [r["text"] for r in manifest.records]
        if edits is not None:
            texts += [r[k] for r in edits.records for k in ("instruction", "target_text") if r.get(k)]
        tok = tokenizer(config, texts, workdir)
        cfg = model_config(config, vae_cfg, None if config.tokenizer.path else tok.vocab_size)
    cfg = with_training_options(config, cfg)
    if tok.vocab_size > cfg.llm.vocab_size:
        raise SetupError(f"the tokenizer has {tok.vocab_size} ids but the LLM only {cfg.llm.vocab_size}")
    p, c = cfg.patch_size, cfg.vae.latent_dim

    # ---- mesh + sharded state
    mesh = shd.make_mesh({"mesh": lm_configs.mesh_sizes(config)})
    try:
        rules = lm_configs.sharding_rules(config)
    except ValueError as e:
        raise SetupError(str(e)) from None
    if config.data.batch_size % sharded.batch_shards(mesh):
        raise SetupError(f"global batch {config.data.batch_size} is not divisible by the mesh's data x fsdp = "
                         f"{sharded.batch_shards(mesh)}")
    if (config.data.batch_size // sharded.batch_shards(mesh)) % config.train.accum_steps:
        raise SetupError(f"per-shard batch is not divisible by accum_steps={config.train.accum_steps}")
    key = jax.random.key(config.seed)
    k_init, k_state = jax.random.split(key)
    params_abs = jax.eval_shape(lambda: model_lib.init_params(cfg, k_init))
    opt = optimizer(config, params_abs)
    state_abs = jax.eval_shape(lambda: init_lm_state(model_lib.init_params(cfg, k_init), opt, k_state))
    param_sh = sharded.param_shardings(cfg, params_abs, mesh, rules)
    state_sh = sharded.state_shardings(state_abs, opt, param_sh, mesh)
    # A full checkpoint gives all params; a VAE checkpoint replaces the random VAE. Both enter the jitted init as
    # arguments already placed in their shardings.
    fixed = jax.device_put(init_params, param_sh) if init_params is not None else None
    fixed_vae = jax.device_put(vae_params, param_sh["audio"]) if vae_cfg is not None else None

    def init_fn(k, fixed, fixed_vae):
        params = fixed if fixed is not None else model_lib.init_params(cfg, k)
        if fixed_vae is not None:
            params = {**params, "audio": fixed_vae}
        return init_lm_state(params, opt, k_state)

    ckpt = TrainCheckpointer(workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep,
                             preemption_check_every=config.checkpoint.get("preemption_check_every", 10))
    state = None
    if ckpt.latest_step() is None:
        state = jax.jit(init_fn, out_shardings=state_sh)(k_init, fixed, fixed_vae)
    del fixed, fixed_vae

    # ---- data pipeline
    data = lm_batches(manifest.records, batch_size=config.data.batch_size, seed=config.seed,
                      source=config.data.source, hop=cfg.vae.hop, buckets_seconds=tuple(config.data.buckets_seconds),
                      max_seconds=config.data.max_seconds, sample_rate=cfg.vae.sample_rate,
                      row_sizes=row_sizes(manifest.records, tok, p))
    it = iter(data)
    edit_it = None
    if config.data.edit_manifest:
        try:
            edit_it = iter(lm_batches(edits.records, batch_size=config.data.batch_size, seed=config.seed + 1,
                                      source=config.data.source, hop=cfg.vae.hop,
                                      buckets_seconds=tuple(config.data.buckets_seconds),
                                      max_seconds=config.data.max_seconds, sample_rate=cfg.vae.sample_rate,
                                      row_sizes=row_sizes(edits.records, tok, p, edit=True)))
        except ValueError as e:
            raise SetupError(f"{config.data.edit_manifest}: {e}") from None

    bad = 0  # rows skipped so far (kept in the checkpoint, so a resumed run goes on counting)

    def data_state() -> dict:
        return {"speech": it.get_state(), "bad_records": bad,
                **({"edit": edit_it.get_state()} if edit_it is not None else {})}

    restored = ckpt.restore(sharded.abstract_state(state_abs, state_sh))
    if restored is not None:
        step0, state, saved = restored
        it.set_state(saved.get("speech", saved))
        bad = int(saved.get("bad_records", 0))
        if edit_it is not None and "edit" in saved:
            edit_it.set_state(saved["edit"])
        if pid == 0:
            print(f"resumed {workdir} at step {step0}")
    # The frozen encoder runs per process on its own rows, with its own copy of the VAE params on a local device
    # (the state's buffers are donated to the train step).
    if config.data.source == "audio":
        if nproc > 1:
            from jax.experimental import multihost_utils

            host_audio = multihost_utils.process_allgather(state["params"]["audio"], tiled=True)
        else:
            host_audio = jax.device_get(state["params"]["audio"])
        audio_params = jax.device_put(host_audio, jax.local_devices()[0])
        del host_audio
    encode = jax.jit(lambda prm, w, n: vae_lib.encode(prm, cfg.vae, w, n, sample=False))
    local_rows = config.data.batch_size // nproc

    def encode_rows(wave, lengths, ok):
        enc = encode(audio_params, jnp.asarray(wave), jnp.asarray(lengths))
        return np.asarray(enc.mean), np.asarray(enc.std), np.where(ok, np.asarray(enc.frame_num), 0)

    step_fn = sharded.jit_step(step_function(config, cfg, opt), state_sh, mesh, rules)
    flops_by_shape: dict = {}
    peak = peak_flops_per_device(jax.devices()[0], config.model.dtype)

    def run_step(state, batch):
        """One step; also the global matmul FLOPs of the step for this batch shape (traced once per shape)."""
        sig = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if sig not in flops_by_shape:
            with shd.use_sharding(mesh, rules):
                flops_by_shape[sig] = float(matmul_flops(step_fn.raw, state, batch))
        return step_fn(state, batch), flops_by_shape[sig]

    preempt = Preemption()
    writer = MetricWriter(workdir, tensorboard=config.tensorboard)
    start = step = int(state["step"])
    total = config.train.steps
    bar = tqdm(total=total, initial=start, desc="train lm", unit="step", disable=pid != 0)
    thr = Throughput(skip=1)  # the first logged interval includes compilation
    interval: list = []
    guard = BadSteps(config.train.max_bad_steps, report=lambda msg: pid == 0 and print(msg, file=sys.stderr))
    try:
        while step < total:
            # a whole step of edit pairs with probability data.edit_fraction (the same choice on every process)
            use_edit = (edit_it is not None
                        and np.random.default_rng([config.seed, step, 7]).random() < config.data.edit_fraction)
            rows = next(edit_it if use_edit else it)
            if config.data.source == "latents":
                mean, std, frames = rows["mean"], rows["std"], rows["lengths"]
            else:
                mean, std, frames = encode_rows(rows["wave"], rows["lengths"], rows["ok"])
            if use_edit:
                tgt = ((rows["target_mean"], rows["target_std"], rows["target_lengths"])
                       if config.data.source == "latents"
                       else encode_rows(rows["target_wave"], rows["target_lengths"], rows["ok"]))
                examples, where, skipped = edit_examples_from_rows(rows, (mean, std, frames), tgt, tok, p,
                                                                   seed=config.seed, step=step)
            else:
                examples, where, skipped = examples_from_rows(rows, mean, std, frames, tok, p, seed=config.seed,
                                                              step=step, tts_fraction=tts_fraction)
            text_cap = config.train.get("text_positions", 0)
            if config.data.seq_len or config.data.max_patches or text_cap:
                # fixed shapes, and text logits at text_positions labels a row: rows that do not fit are skipped
                fits = [j for j, e in enumerate(examples)
                        if (not config.data.seq_len or len(e["input_ids"]) <= config.data.seq_len)
                        and (not config.data.max_patches or e["num_patches"] <= config.data.max_patches)
                        and (not text_cap or int(np.sum(e["text_labels"] != lm_data.IGNORE)) <= text_cap)]
                skipped += len(examples) - len(fits)
                examples, where = [examples[j] for j in fits], [where[j] for j in fits]
            bad += skipped
            # shapes from the plan (the bucket's patches, the global batch's longest text): no agreement needed
            patches = mean.shape[1] // p + (tgt[0].shape[1] // p if use_edit else 0)
            max_len, max_patches = planned_sizes(rows["plan_size"], patches, config.data.seq_len,
                                                 config.data.max_patches)
            local = place(examples, where, local_rows, max_len, max_patches, tok.id("eos"), c, p)
            local.pop("is_tts")
            if s2:  # the waveform each row's latents came from, for the full-path mel loss
                local.update(row_waves(rows, where, local["latent_valid"], max_patches * p * cfg.vae.hop,
                                       cfg.vae.hop))
            batch = sharded.global_batch(local, mesh)
            (state, metrics), flops = run_step(state, batch)
            step += 1
            guard.add(step, metrics["skipped_step"])
            interval.append(float(local["valid"].sum()) * nproc)
            if step % config.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                guard.check()
                t = thr.update(units=sum(interval), steps=len(interval))
                interval.clear()
                m.update(step=step, bad_records=bad, edit_step=int(use_edit))
                if t is not None:
                    m.update(step_s=t["step_s"], tokens_per_s=t["units_per_s"])
                    if flops and peak:
                        m["mfu"] = mfu(flops, t["step_s"], jax.device_count(), peak)
                writer.scalars(step, m)
                extra = {"mel": f"{m['mel']:.3f}"} if "mel" in m else {"flow": f"{m['flow']:.3f}"}
                bar.set_postfix(loss=f"{m['loss']:.3f}", text=f"{m['text_ce']:.3f}", **extra,
                                tok_s=f"{m.get('tokens_per_s') or 0:.0f}")
            bar.update(1)
            if ckpt.after_step(step, state, data_state(), preempt=preempt, stop_after=stop_after, start=start,
                               total=total, say=print if pid == 0 else (lambda *a, **k: None)):
                return 0
        ckpt.save(step, state, data_state(), force=True)
        ckpt.wait()
    finally:
        bar.close()
        preempt.restore()
        ckpt.close()
        writer.close()

    # ---- export for sample.py (process 0 writes)
    host = sharded.to_host(state["params"])
    export = os.path.join(workdir, "export")
    tok_dir = os.path.join(workdir, "tokenizer")
    if pid == 0:
        if config.tokenizer.path or config.init.checkpoint:
            tok.save(tok_dir)
        save(Checkpoint({"uniaudio": with_training_options(config, cfg, export=True)}, {"uniaudio": host}, source="train.py lm", path=tok_dir), export,
             overwrite=True)
        print(f"done: {step} steps ({bad} rows skipped); checkpoints in {ckpt.directory}; model in {export} "
              f"(python sample.py tts --checkpoint {export} ...)")
    return 0
