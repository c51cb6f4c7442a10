"""The LM stage behind ``train.py --config configs/lm.py:...`` (:mod:`unitok_jax.cli.train`; spec §5.7, §5.8,
§7.2): :class:`LMStage`, run by the training loop every stage shares (:mod:`unitok_jax.training.loop`). Any mesh,
any number of processes:

1. the model config from ``config.model.bailingmm`` (the VAE part from the VAE checkpoint when one is given), the
   text tokenizer (a folder, or a BPE trained on the manifest's texts and kept in the workdir);
2. one mesh (:mod:`unitok_jax.sharding`); the train state ``{step, params, opt_state, rng, skipped}`` created
   directly in its shardings (:mod:`unitok_jax.training.sharded`); the step is one ``jax.jit`` with in/out
   shardings and donated state (:func:`unitok_jax.training.lm_step.make_lm_train_step`);
3. data: every process loads its rows of each global batch (:mod:`unitok_jax.data.lm_pipeline`); the frozen VAE's
   posterior comes from the latent cache or is computed on the fly; each row becomes a TTS or an ASR sequence
   (:mod:`unitok_jax.training.lm_data`) with a per-(step, row) RNG, so what a row trains on does not depend on how
   many processes share the batch;
4. held-out evaluation with ``data.heldout_manifest`` (:mod:`unitok_jax.training.lm_eval`: loss, transcripts and
   speech samples);
5. from the loop: orbax checkpoints every N steps and on SIGTERM (with the data position), resume, metrics (console,
   JSONL, TensorBoard), the export of the inference params + tokenizer for ``sample.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import jax
import numpy as np

from unitok_jax import text as text_lib
from unitok_jax import vae as vae_lib
from unitok_jax.model import UniAudioConfig
from unitok_jax.training import lm_data
from unitok_jax.training.guard import NonFiniteError, SetupError  # noqa: F401  (raised by run)
from unitok_jax.training.loop import Stage, Step


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
    """``cfg`` with the LLM's ``model.remat``, ``model.attention`` and ``model.moe_dispatch`` of the config
    (``export``: reset to the defaults, which an export for sampling should carry)."""
    attention = config.model.get("attention", "auto")
    if attention not in ("auto", "xla", "cudnn"):
        raise SetupError(f"model.attention={attention!r}: choose 'auto', 'xla' or 'cudnn'")
    remat = False if export else bool(config.model.get("remat", False))
    impl = None if export or attention == "auto" else attention
    dispatch = "psum" if export else config.model.get("moe_dispatch", "psum")
    if dispatch not in ("psum", "a2a"):
        raise SetupError(f"model.moe_dispatch={dispatch!r}: choose 'psum' or 'a2a'")
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, remat=remat, attention_impl=impl,
                                                            moe_dispatch=dispatch))


def tokenizer(config, texts, workdir: str) -> text_lib.TextTokenizer:
    """The configured tokenizer folder; else the one saved in ``workdir/tokenizer`` by an earlier run; else a BPE
    trained on ``texts`` (then saved there by process 0, so a resumed run keeps its ids; ``texts`` None: a
    SetupError instead)."""
    if config.tokenizer.path:
        return text_lib.TextTokenizer.from_dir(config.tokenizer.path)
    folder = os.path.join(workdir, "tokenizer")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return text_lib.TextTokenizer.from_dir(folder)
    if texts is None:
        raise SetupError(f"no tokenizer: set tokenizer.path, or keep the one the run saved in {folder}")
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


# ------------------------------------------------------------------------------------------------ the stage


class LMStage(Stage):
    """The LM stage (and S2) for :func:`unitok_jax.training.loop.run` (``data=False``: model, mesh and abstract
    state only, for an export)."""

    name = "lm"
    units = "tokens_per_s"
    skipped_metric = "skipped_step"

    def __init__(self, config, workdir: str, *, data: bool = True):
        from unitok_jax import model as model_lib
        from unitok_jax.configs import lm as lm_configs
        from unitok_jax.convert import load, read_configs, read_vae_config
        from unitok_jax.training import sharded
        from unitok_jax.training.lm_step import init_lm_state
        from unitok_jax.training.loop import stage_mesh

        super().__init__(config, workdir, data=data)
        self.compute_dtype = config.model.dtype
        self.s2 = unified_stage(config)
        if data:
            self._read_manifests()

        # ---- tokenizer + model config (an export reads configs only, no params)
        init_params, vae_cfg, vae_params = None, None, None
        if config.init.checkpoint:
            if data:
                ck = load(config.init.checkpoint)
                if "uniaudio" not in ck.configs:
                    raise SetupError(f"{config.init.checkpoint} is not a full model checkpoint (use init.vae for a "
                                     "VAE)")
                cfg, init_params = ck.configs["uniaudio"], ck.params["uniaudio"]
            else:
                cfg = read_configs(config.init.checkpoint)["uniaudio"]
            tok = text_lib.TextTokenizer.from_dir(config.tokenizer.path or config.init.checkpoint)
        else:
            if config.init.vae:
                if data:
                    vae_cfg, vae_params = load(config.init.vae).vae()
                else:
                    vae_cfg = read_vae_config(config.init.vae)
            texts = None
            if data:
                texts = [r["text"] for r in self.records]
                if self.edits is not None:
                    texts += [r[k] for r in self.edits for k in ("instruction", "target_text") if r.get(k)]
            tok = tokenizer(config, texts, workdir)
            cfg = model_config(config, vae_cfg, None if config.tokenizer.path else tok.vocab_size)
        cfg = with_training_options(config, cfg)
        if tok.vocab_size > cfg.llm.vocab_size:
            raise SetupError(f"the tokenizer has {tok.vocab_size} ids but the LLM only {cfg.llm.vocab_size}")
        self.cfg, self.tok = cfg, tok

        # ---- mesh + sharded state
        self.mesh = stage_mesh(lm_configs.mesh_sizes(config), data=data)
        try:
            self.rules = lm_configs.sharding_rules(config)
        except ValueError as e:
            raise SetupError(str(e)) from None
        shards = sharded.batch_shards(self.mesh)
        if data and config.data.batch_size % shards:
            raise SetupError(f"global batch {config.data.batch_size} is not divisible by the mesh's data x fsdp = "
                             f"{shards}")
        if data and (config.data.batch_size // shards) % config.train.accum_steps:
            raise SetupError(f"per-shard batch is not divisible by accum_steps={config.train.accum_steps}")
        key = jax.random.key(config.seed)
        k_init, k_state = jax.random.split(key)
        params_abs = jax.eval_shape(lambda: model_lib.init_params(cfg, k_init))
        self.opt = optimizer(config, params_abs)
        self.state_abs = jax.eval_shape(lambda: init_lm_state(model_lib.init_params(cfg, k_init), self.opt,
                                                              k_state))
        self.param_sh = sharded.param_shardings(cfg, params_abs, self.mesh, self.rules)
        self.state_sh = sharded.state_shardings(self.state_abs, self.opt, self.param_sh, self.mesh)
        self._init = (k_init, k_state, init_params, vae_params)
        if data:
            self._setup_data()

    def _read_manifests(self) -> None:
        config = self.config
        self.records = self.read_manifest("manifest", "{id, audio, text, speaker}", require_text=True,
                                          add_durations=True)
        self.edits = None
        if config.data.edit_manifest:
            self.edits = self.read_manifest("edit_manifest", "edit pairs", require_text=True, add_durations=True)
        if self.s2 and config.data.source != "audio":
            raise SetupError("train.objective=s2 decodes the waveform: it needs data.source=audio")
        if config.data.get("pack", False):
            if config.data.source != "latents":
                raise SetupError("data.pack=True reads the latent cache: set data.source=latents (python -m "
                                 "unitok_jax.data.latent_cache builds it)")
            if config.data.seq_len <= 0 or config.data.max_patches <= 0:
                raise SetupError("data.pack=True needs the packed row size: data.seq_len > 0 and "
                                 "data.max_patches > 0")
        if self.s2 and config.data.edit_manifest:
            raise SetupError("train.objective=s2 trains on ASR sequences only: unset data.edit_manifest")
        if self.s2 and not config.init.checkpoint:
            self.say("warning: train.objective=s2 without init.checkpoint aligns to a randomly initialised LLM",
                     file=sys.stderr)

    def _setup_data(self) -> None:
        from unitok_jax.data.lm_pipeline import lm_batches
        from unitok_jax.training import sharded

        config, cfg, tok = self.config, self.cfg, self.tok
        p = cfg.patch_size

        def batches(records, seed, edit):
            return lm_batches(records, batch_size=config.data.batch_size, seed=seed, source=config.data.source,
                              hop=cfg.vae.hop, buckets_seconds=tuple(config.data.buckets_seconds),
                              max_seconds=config.data.max_seconds, sample_rate=cfg.vae.sample_rate,
                              row_sizes=row_sizes(records, tok, p, edit=edit),
                              pack_len=config.data.seq_len if config.data.get("pack", False) else 0,
                              pack_patches=config.data.max_patches, patch_size=p,
                              note=lambda msg: self.say(msg, file=sys.stderr))

        try:
            self.it = iter(batches(self.records, config.seed, False))
        except ValueError as e:
            raise SetupError(f"{config.data.manifest}: {e}") from None
        self.edit_it = None
        if self.edits is not None:
            try:
                self.edit_it = iter(batches(self.edits, config.seed + 1, True))
            except ValueError as e:
                raise SetupError(f"{config.data.edit_manifest}: {e}") from None
        self.tts_fraction = 0.0 if self.s2 else config.data.tts_fraction
        self.local_rows = config.data.batch_size // self.nproc
        self.step_fn = sharded.jit_step(step_function(config, cfg, self.opt), self.state_sh, self.mesh, self.rules)
        self.sample_every = config.sample_every if config.data.heldout_manifest else 0
        self._audio_params = self._encode = None  # the frozen encoder on the mesh (:meth:`begin`)
        self._heldout = None

    # ---- what the loop calls

    def init_state(self):
        from unitok_jax import model as model_lib
        from unitok_jax.training.lm_step import init_lm_state

        k_init, k_state, init_params, vae_params = self._init
        cfg, opt = self.cfg, self.opt
        # A full checkpoint gives all params; a VAE checkpoint replaces the random VAE. Both enter the jitted init
        # as arguments already placed in their shardings.
        fixed = jax.device_put(init_params, self.param_sh) if init_params is not None else None
        fixed_vae = jax.device_put(vae_params, self.param_sh["audio"]) if vae_params is not None else None
        self._init = (k_init, k_state, None, None)

        def init_fn(k, fixed, fixed_vae):
            params = fixed if fixed is not None else model_lib.init_params(cfg, k)
            if fixed_vae is not None:
                params = {**params, "audio": fixed_vae}
            return init_lm_state(params, opt, k_state)

        return jax.jit(init_fn, out_shardings=self.state_sh)(k_init, fixed, fixed_vae)

    def data_state(self) -> dict:
        return {"speech": self.it.get_state(), "bad_records": self.bad_records,
                **({"edit": self.edit_it.get_state()} if self.edit_it is not None else {})}

    def set_data_state(self, saved: dict) -> None:
        self.it.set_state(saved.get("speech", saved))
        self.bad_records = int(saved.get("bad_records", 0))
        if self.edit_it is not None and "edit" in saved:
            self.edit_it.set_state(saved["edit"])

    def host_vae(self, state):
        """The (frozen) VAE's params of ``state`` as host arrays, whole, on every process."""
        if self.nproc > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(state["params"]["audio"], tiled=True)
        return jax.device_get(state["params"]["audio"])

    def begin(self, state) -> None:
        """With ``data.source=audio`` the frozen encoder runs on the whole mesh, inside one jitted function: its own
        replicated copy of the VAE params (the state's buffers are donated to the train step), each device encoding
        its rows of the global batch (the same batch split as the train step)."""
        if self.config.data.source != "audio":
            return
        from jax.sharding import NamedSharding, PartitionSpec as P

        from unitok_jax.training import sharded

        rep, rows = NamedSharding(self.mesh, P()), sharded.batch_sharding(self.mesh)
        self._audio_params = jax.device_put(self.host_vae(state), rep)
        vcfg = self.cfg.vae

        def encode(prm, wave, lengths):
            enc = vae_lib.encode(prm, vcfg, wave, lengths, sample=False)
            return enc.mean, enc.std, enc.frame_num

        self._encode = jax.jit(encode, in_shardings=(rep, rows, rows), out_shardings=rows)

    def encode_rows(self, wave, lengths, ok):
        """(posterior mean, std, frames) of this process's rows of audio (``ok`` False: 0 frames) by the frozen
        encoder on the mesh (host numpy, this process's rows)."""
        from unitok_jax.training import sharded

        g = sharded.global_batch({"wave": wave, "lengths": lengths}, self.mesh)
        out = self._encode(self._audio_params, g["wave"], g["lengths"])
        mean, std, frames = (sharded.local_rows(x, self.mesh) for x in out)
        return mean, std, np.where(ok, frames, 0)

    def next_step(self, step: int) -> Step:
        from unitok_jax.training import sharded

        config, cfg, tok = self.config, self.cfg, self.tok
        p, c = cfg.patch_size, cfg.vae.latent_dim
        # a whole step of edit pairs with probability data.edit_fraction (the same choice on every process)
        use_edit = (self.edit_it is not None
                    and np.random.default_rng([config.seed, step, 7]).random() < config.data.edit_fraction)
        rows = next(self.edit_it if use_edit else self.it)
        if config.data.source == "latents":
            mean, std, frames = rows["mean"], rows["std"], rows["lengths"]
        else:
            mean, std, frames = self.encode_rows(rows["wave"], rows["lengths"], rows["ok"])
        if use_edit:
            tgt = ((rows["target_mean"], rows["target_std"], rows["target_lengths"])
                   if config.data.source == "latents"
                   else self.encode_rows(rows["target_wave"], rows["target_lengths"], rows["ok"]))
            examples, where, skipped = edit_examples_from_rows(rows, (mean, std, frames), tgt, tok, p,
                                                               seed=config.seed, step=step)
        else:
            examples, where, skipped = examples_from_rows(rows, mean, std, frames, tok, p, seed=config.seed,
                                                          step=step, tts_fraction=self.tts_fraction)
        if config.data.get("pack", False):  # the rows the plan gave each record; one batch shape for the whole run
            local, unfit = lm_data.pack_examples(
                examples, self.local_rows, config.data.seq_len, config.data.max_patches, pad_id=tok.id("eos"),
                where=[int(rows["pack_row"][k]) for k in where], ids=[int(rows["row"][k]) for k in where],
                text_cap=config.train.get("text_positions", 0), latent_dim=c, patch_size=p)
            self.bad_records += skipped + len(unfit)
        else:
            examples, where, unfit = fit_examples(config, examples, where)
            self.bad_records += skipped + unfit
            # shapes from the plan (the bucket's patches, the global batch's longest text): no agreement needed
            patches = mean.shape[1] // p + (tgt[0].shape[1] // p if use_edit else 0)
            max_len, max_patches = planned_sizes(rows["plan_size"], patches, config.data.seq_len,
                                                 config.data.max_patches)
            local = place(examples, where, self.local_rows, max_len, max_patches, tok.id("eos"), c, p)
            local.pop("is_tts")
        if self.s2:  # the waveform each row's latents came from, for the full-path mel loss
            local.update(row_waves(rows, where, local["latent_valid"], max_patches * p * cfg.vae.hop, cfg.vae.hop))
        units = float(local["valid"].sum()) * self.nproc
        return Step(self.step_fn, sharded.global_batch(local, self.mesh), units, {"edit_step": int(use_edit)})

    def evaluate(self, step: int, state, writer) -> dict:
        from unitok_jax.training import lm_eval

        if self._heldout is None:
            self._heldout = lm_eval.HeldOut(self, state)
        return self._heldout(step, state, writer)

    def postfix(self, m: dict) -> dict:
        extra = {"mel": f"{m['mel']:.3f}"} if "mel" in m else {"flow": f"{m['flow']:.3f}"}
        return {"loss": f"{m['loss']:.3f}", "text": f"{m['text_ce']:.3f}", **extra,
                "tok_s": f"{m.get('tokens_per_s') or 0:.0f}"}

    def export(self, state, out: str, step: int) -> str:
        from unitok_jax.convert import Checkpoint, save
        from unitok_jax.training import sharded

        config = self.config
        host = sharded.to_host(state["params"])
        tok_dir = os.path.join(self.workdir, "tokenizer")
        if jax.process_index() == 0:
            if config.tokenizer.path or config.init.checkpoint:
                self.tok.save(tok_dir)
            save(Checkpoint({"uniaudio": with_training_options(config, self.cfg, export=True)}, {"uniaudio": host},
                            source=f"train.py lm, step {step}", path=tok_dir), out, overwrite=True)
        return f"model of step {step} in {out} (python sample.py tts --checkpoint {out} ...)"


def fit_examples(config, examples: list, where: list[int]) -> tuple[list, list[int], int]:
    """With fixed shapes (``data.seq_len`` / ``data.max_patches``) or text logits at ``train.text_positions`` labels
    a row, the examples that fit (and their rows), and how many did not (skipped and counted)."""
    seq_len, max_patches = config.data.seq_len, config.data.max_patches
    text_cap = config.train.get("text_positions", 0)
    if not (seq_len or max_patches or text_cap):
        return examples, where, 0
    fits = [j for j, e in enumerate(examples)
            if (not seq_len or len(e["input_ids"]) <= seq_len)
            and (not max_patches or e["num_patches"] <= max_patches)
            and (not text_cap or int(np.sum(e["text_labels"] != lm_data.IGNORE)) <= text_cap)]
    return [examples[j] for j in fits], [where[j] for j in fits], len(examples) - len(fits)

