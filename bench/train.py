#!/usr/bin/env python
"""Training-step speed: one jitted, donated train step of the VAE stage (alternating GAN update) and of the LM stage
(semantic module + BailingMoE LLM + flow head + stop head, AdamW), with step time, throughput, FLOPs per step and
MFU. Random weights, float32, full-precision matmuls (like the other benchmarks).

Rows (``--sizes``, default ``tiny`` with ``--quick`` and ``tiny,small`` otherwise; ``demo``: the VAE and LLM that
``make demo`` trains, ``unitok_jax.demo.VAE_H128`` / ``LLM_H128`` at its recipes' batch sizes):

* ``vae``: ``configs/vae.py:tiny`` (64-wide backbones, ``DiscConfig.tiny()``), batch 4 x 1 s crops of real speech;
  ``small``: the audio tokenizer of ``../shared/perf/small/config.json`` (256-wide) with the same discriminators.
  Units: seconds of audio per second. Two rows each: ``gan`` (the alternating GAN step) and ``mel+kl`` (the step of
  the steps before ``train.adv_start_step``, which runs no discriminator; the demo's VAE trains only with it).
* ``lm``: ``generate.TINY_BAILINGMM`` (vocab from a BPE trained on a few sentences) / the full small config
  (512-wide LLM, 16 experts top-2 + 1 shared), batches from ``training.lm_data`` (half TTS, half ASR rows, random
  latents), bucketed by ``make_batch``. Units: real (non-padding) tokens per second.

In-run ratios: **the VAE's GAN step vs its mel + KL step**; **grouped-matmul MoE vs dense MoE** (``moe_impl="auto"``, which on CPU resolves to the looped tile
grouped matmul for training shapes, against ``"dense"``: every expert on every token), same weights and batches,
repeats interleaved; the full run adds the batched ``"tiled"`` form and ``jax.lax.ragged_dot`` (masked dense on
XLA:CPU).

FLOPs: ``XLA GF`` is XLA's cost analysis of the compiled step (counts every loop body once: the scanned layer stacks
and the looped MoE are undercounted); ``matmul GF`` is :func:`unitok_jax.training.monitor.matmul_flops` (matrix
products of the traced step, loops times their trip counts, global); MFU uses the latter and the device's dense peak
(:func:`~unitok_jax.training.monitor.peak_flops_per_device`; none is known for CPUs, so "n/a" unless
``--peak-tflops`` is given).

``--official``: the official-size LM train step (``configs/llm.py:official`` LLM in bfloat16 with the ``ragged``
grouped matmul that TPU/GPU run, the ``configs/vae.py:official`` VAE estimate, a DiT with the reference class
defaults) is only traced with abstract inputs (``jax.eval_shape``, nothing allocated) to count its FLOPs per step
(and per token), and the time one step would take at 100 % of an H100's bf16 peak.

Issue 18 measurements (always run; ``--no-issue18`` skips them):

* **compiled peak memory per device of an LM step** (XLA's memory analysis of the jitted, donated step lowered from
  abstract arrays, nothing allocated; peak = argument + output - alias + temp, as ``bench/memory.py``): the LM stage
  of ``configs/lm.py:tiny`` with the release vocabulary (126,464), batch 8 x 512 positions, with text logits at
  every position (``train.text_positions=0``: before) and at the labelled positions (128 a row: after); the full
  run adds ``model.remat``; ``--quick`` compiles the text loss alone (final hiddens -> LM head -> CE, value and
  gradients), not the whole step, to stay within its time;
* **host collectives per step** of a multi-process run: the training loop's per-step host logic (checkpoint
  policy / stop decision and the batch-shape decision) run for 100 steps with ``jax.process_count()`` stubbed to 2
  and ``multihost_utils.process_allgather`` counting its calls; "before" runs the same harness on the code of
  ``--baseline-rev`` (read with ``git show``; skipped outside a git checkout).

* with ``--lm-plan WORKDIR`` (an LM-stage workdir, e.g. ``make demo``'s ``demo/work/lm``): the run's batches rebuilt
  from its ``config.json`` as its loop builds them (no training step): compiled programs, padding fraction and host
  time per step with its length buckets, with one fixed shape and (latent source) packed (``data.pack``, rows x
  tokens x patches from ``--pack-shape``, default the run's batch size x 256 x 96); ``--json`` then carries
  ``host_wait_fraction``, ``compiled_programs`` and ``padding_fraction`` (of the packed run; of the bucketed run
  for an audio-source run). ``--lm-plan-steps N`` also runs the first N steps of each (random params; every batch
  shape compiled first, not timed): ms per step and real (non-padding) tokens per second, the ratio to the buckets.

  python bench/train.py [--quick] [--sizes tiny,small|none] [--official] [--peak-tflops X] [--lm-plan WORKDIR]
                        [--pack-shape ROWSxTOKENSxPATCHES] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unitok_jax import demo, generate, model, moe, text, vae  # noqa: E402
from unitok_jax.configs import llm as llm_configs  # noqa: E402
from unitok_jax.configs import vae as vae_configs  # noqa: E402
from unitok_jax.audio import load_audio  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402
from unitok_jax.training import lm_data, lm_step, monitor  # noqa: E402
from unitok_jax.training.discriminators import DiscConfig  # noqa: E402
from unitok_jax.training.vae_step import (  # noqa: E402
    OptConfig,
    VAETrainConfig,
    init_vae_train_state,
    vae_train_step,
)

SHARED = REPO.parent / "shared"
SMALL = SHARED / "perf" / "small" / "config.json"
SPEECH = SHARED / "data" / "librispeech-1089-134686-0000.flac"
SENTENCES = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
             "fat mutton pieces to be ladled out", "please translate the text to speech",
             "English\tlet us go home now"]
# The DiT of the official model is not in configs/ (its ditar_config comes with the checkpoint): the reference
# FlowLoss class defaults (FlowConfig's, depth 8) stand in for it.
OFFICIAL_DITAR = {"hidden_size": 1024, "depth": 8, "num_heads": 16, "mlp_ratio": 4.0}
H100_BF16 = monitor.peak_flops_per_device(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3", "platform": "gpu"}))


def small_config() -> dict | None:
    return json.loads(SMALL.read_text()) if SMALL.is_file() else None


# ------------------------------------------------------------------------------------------------ cases


def random_params(init_fn, seed: int = 0):
    """Random params with the structure of ``init_fn()`` (traced with ``jax.eval_shape``, not run: the eager
    flax inits cost tens of seconds on CPU): norm scales 1, biases 0, other leaves N(0, 0.02^2)."""
    abstract = jax.eval_shape(init_fn)
    rng = np.random.default_rng(seed)

    def make(path, x):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        if name == "scale":
            return jnp.ones(x.shape, x.dtype)
        if name == "bias":
            return jnp.zeros(x.shape, x.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(x.shape, np.float32), x.dtype)

    return jax.block_until_ready(jax.tree_util.tree_map_with_path(make, abstract))


class Case:
    """A compiled, donated train step with its own state and one fixed batch; ``run()`` does one step."""

    def __init__(self, label: dict, step_fn, state, batch, units: float):
        self.label, self.units = label, units
        self.batch = jax.block_until_ready(jax.tree.map(jnp.asarray, batch))
        self.flops = monitor.matmul_flops(step_fn, state, self.batch)
        t0 = time.perf_counter()
        self.compiled = jax.jit(step_fn, donate_argnums=0).lower(state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.xla_flops = monitor.compiled_flops(self.compiled)
        self.state = state
        self.throughput = monitor.Throughput(skip=1)  # the first (warm-up) call is not counted

    def run(self) -> None:
        self.throughput.start()  # cases are interleaved: time this step only
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.throughput.update(units=self.units)

    def row(self, peak, n_dev: int) -> dict:
        s = self.throughput.summary()
        step_s = statistics.median(self.throughput.step_times)
        return {**self.label, "compile_s": self.compile_s, "repeats": s["steps"], "step_ms": 1e3 * step_s,
                "step_ms_min": 1e3 * min(self.throughput.step_times), "units_per_s": self.units / step_s,
                "xla_flops": self.xla_flops, "matmul_flops": float(self.flops),
                "achieved_flops_per_s": self.flops / step_s,
                "mfu": monitor.mfu(self.flops, step_s, n_dev, peak)}


def time_cases(cases, budget_s: float, lo: int, hi: int) -> None:
    """One warm-up call each, then interleaved repeats (machine noise hits all cases alike)."""
    for c in cases:
        c.run()
    start = time.perf_counter()
    i = 0
    while i < lo or (i < hi and time.perf_counter() - start < budget_s * len(cases)):
        for c in cases:
            c.run()
        i += 1


def vae_case(size: str, kwargs: dict, batch: int, seconds: float, disc: DiscConfig, gan: bool = True) -> Case:
    """The S0 step with the GAN on (``impl`` "gan") or the mel + KL step of the steps before adv_start_step, which
    runs no discriminator (``impl`` "mel+kl")."""
    vcfg = vae.VAEConfig.from_reference(kwargs)
    tcfg = VAETrainConfig(vae=vcfg)
    ocfg = OptConfig(lr=3e-4)
    params = random_params(lambda: vae.init_params(vcfg, jax.random.key(0)))
    state = init_vae_train_state(tcfg, params, disc, ocfg, jax.random.key(1))
    speech = load_audio(str(SPEECH))
    n = int(seconds * vcfg.sample_rate)
    starts = [(i * n) % max(len(speech) - n, 1) for i in range(batch)]
    wave = np.stack([speech[s: s + n] for s in starts]).astype(np.float32)
    data = {"wave": wave, "lengths": np.full((batch,), n, np.int32)}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["gen_params"]))
    label = {"stage": "vae", "size": size, "impl": "gan" if gan else "mel+kl", "batch": batch,
             "shape": f"{seconds:g} s", "params_M": n_params / 1e6, "unit": "audio s/s"}
    return Case(label, lambda s, b: vae_train_step(s, b, tcfg, disc, ocfg, gan=gan), state, data, batch * seconds)


def lm_examples_batch(tok, latent_dim: int, frames: int, batch: int, patch: int, seed: int = 0) -> dict:
    """Half TTS, half ASR rows of ``frames`` random latent frames each, bucketed by make_batch."""
    rng = np.random.default_rng(seed)
    exs = []
    for i in range(batch):
        lat = rng.standard_normal((frames, latent_dim)).astype(np.float32)
        s = SENTENCES[i % len(SENTENCES)]
        exs.append(lm_data.tts_example(tok, s, lat, patch) if i % 2 == 0 else lm_data.asr_example(tok, lat, s,
                                                                                                 patch_size=patch))
    return lm_data.make_batch(exs)


def lm_setup(size: str):
    """(bailingmm config dict, tokenizer, frames per row, batch) for a size."""
    tok = text.train_tokenizer(SENTENCES * 4, vocab_size=320)
    if size in ("tiny", "demo"):
        conf, frames, batch = copy.deepcopy(generate.TINY_BAILINGMM), 180, 4
        conf["llm_config"]["vocab_size"] = tok.vocab_size
        if size == "demo":  # the LLM `make demo` trains (demo.LLM_H128), batch 8 as its recipe
            conf["llm_config"].update({k.rsplit(".", 1)[1]: v for k, v in demo.LLM_H128.items()})
            batch = demo.FULL_LM["data.batch_size"]
    else:
        conf, frames, batch = copy.deepcopy(small_config()), 500, 4
        conf["llm_config"]["vocab_size"] = max(tok.vocab_size, conf["llm_config"]["vocab_size"])
    return conf, tok, frames, batch


def lm_case(size: str, impl: str, conf: dict, tok, frames: int, batch: int) -> Case:
    cfg = model.UniAudioConfig.from_bailingmm(conf, moe_impl=impl)
    params = random_params(lambda: model.init_params(cfg, jax.random.key(0)))  # same weights for every impl
    tx = lm_step.masked_optimizer(params, lm_step.adamw(1e-4, warmup_steps=0))
    state = lm_step.init_lm_state(params, tx, jax.random.key(4))
    data = lm_examples_batch(tok, cfg.vae.latent_dim, frames, batch, cfg.patch_size)
    b, s = data["input_ids"].shape
    rows = b * s * cfg.llm.num_experts_per_tok
    resolved = moe.resolve_impl(impl, rows, cfg.llm.num_experts)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["model"]))
    label = {"stage": "lm", "size": size, "impl": impl if impl == resolved else f"{impl}={resolved}", "batch": b,
             "shape": f"{s} tok", "params_M": n_params / 1e6, "unit": "tok/s",
             "valid_tokens": int(data["valid"].sum()), "padded_tokens": b * s,
             "patches": int(data["num_patches"].sum())}
    return Case(label, lm_step.make_lm_train_step(cfg, tx), state, data, float(data["valid"].sum()))


# ------------------------------------------------------------------------------------------------ official size


def llm_analytic_train_flops(cfg, tokens: int, context: int) -> float:
    """3 x (2 x active LLM matmul params + attention over ``context`` keys) x tokens: the usual 6N estimate for the
    LLM part alone (no semantic module, flow head, stop head)."""
    c = cfg.llm
    d, n, k, hd = c.width, c.num_heads, c.num_kv_heads, c.head_dim
    attn = d * (n + 2 * k) * hd + n * hd * d
    moe_p = d * c.num_experts + c.num_experts_per_tok * 3 * d * c.moe_intermediate_size + 3 * d * (c.shared_dim or 0)
    active = c.num_moe_layers * (attn + moe_p) + c.num_dense_layers * (attn + 3 * d * c.mlp_dim) + d * c.vocab_size
    return 3.0 * tokens * (2 * active + c.num_layers * 4 * context * n * hd)


def official_lm(batch: int, frames: int) -> dict:
    llm_cfg = llm_configs.get_config("official")
    conf = {"llm_config": llm_cfg.llm_config.to_dict(),
            "audio_tokenizer_config": {**vae_configs.get_config("official").vae.to_dict(), "patch_size": 5},
            "ditar_config": OFFICIAL_DITAR}
    cfg = model.UniAudioConfig.from_bailingmm(conf, moe_impl="ragged", dtype="bfloat16")
    tok = text.train_tokenizer(SENTENCES * 4, vocab_size=320)
    data = lm_examples_batch(tok, cfg.vae.latent_dim, frames, batch, cfg.patch_size)
    t0 = time.perf_counter()
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    tx = lm_step.masked_optimizer(params, lm_step.adamw(1e-4, warmup_steps=0))
    state = jax.eval_shape(lambda p: lm_step.init_lm_state(p, tx, jax.random.key(4)), params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), data)
    step = lm_step.make_lm_train_step(cfg, tx)
    flops = monitor.matmul_flops(step, state, abstract)
    trace_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    xla = monitor.compiled_flops(jax.jit(step, donate_argnums=0).lower(state, abstract).compile())
    compile_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["model"]))
    b, s = data["input_ids"].shape
    valid = int(data["valid"].sum())
    analytic = llm_analytic_train_flops(cfg, b * s, s)
    return {"stage": "lm", "size": "official", "impl": "ragged", "dtype": "bfloat16", "batch": b, "seq": s,
            "patches": int(data["num_patches"].sum()), "valid_tokens": valid, "llm_params_B": n_params / 1e9,
            "matmul_flops": float(flops), "flops_per_padded_token": flops / (b * s),
            "llm_6n_flops": analytic, "trace_s": trace_s, "xla_cpu_flops": xla, "cpu_compile_s": compile_s,
            "h100_bf16_step_ms_at_peak": 1e3 * flops / H100_BF16}


# ------------------------------------------------------------------------------------------------ issue 18

RELEASE_VOCAB = 126_464


def lm_step_memory(text_positions: int, remat: bool = False, batch: int = 8, seq: int = 512,
                   patches: int = 64) -> dict:
    """Compiled memory of one LM-stage train step (configs/lm.py:tiny with the release vocabulary), from abstract
    state and batch on one device."""
    from unitok_jax.configs import lm as lm_configs
    from unitok_jax.training import lm_train

    config = lm_configs.get_config("tiny")
    config.model.bailingmm["llm_config"]["vocab_size"] = RELEASE_VOCAB
    config.train.text_positions = text_positions
    config.model.remat = remat
    cfg = lm_train.with_training_options(config, lm_train.model_config(config))
    params_abs = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    opt = lm_train.optimizer(config, params_abs)
    state_abs = jax.eval_shape(lambda p: lm_step.init_lm_state(p, opt, jax.random.key(1)), params_abs)
    step = lm_train.step_function(config, cfg, opt)
    b, s = batch, seq
    shapes = lm_data.batch_shapes(b, s, patches, cfg.patch_size, cfg.vae.latent_dim)
    batch_abs = {k: jax.ShapeDtypeStruct(shape, dt) for k, (shape, dt) in shapes.items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state_abs, batch_abs).compile()
    m = compiled.memory_analysis()
    out = {"text_positions": text_positions, "remat": remat, "batch": b, "seq": s, "vocab": RELEASE_VOCAB,
           "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "compile_s": time.perf_counter() - t0}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def text_loss_memory(text_positions: int, batch: int = 8, seq: int = 512) -> dict:
    """``--quick``: compiled memory of the text loss alone (final hiddens -> LM head -> float32 CE, value and
    gradients w.r.t. the hiddens and the params), same model, vocabulary and batch as :func:`lm_step_memory`."""
    from unitok_jax.configs import lm as lm_configs
    from unitok_jax.training import lm_train

    config = lm_configs.get_config("tiny")
    config.model.bailingmm["llm_config"]["vocab_size"] = RELEASE_VOCAB
    cfg = lm_train.model_config(config)
    params_abs = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))

    def loss(params, hidden, labels, valid):
        if text_positions > 0:
            return lm_step.text_loss_at_labels(params, cfg, hidden, labels, valid, text_positions)[0]
        logits = model.llm_module(cfg).apply(model.llm_vars(params), hidden, method="head")
        return lm_step.text_cross_entropy(logits, labels, valid)[0]

    args = (params_abs, jax.ShapeDtypeStruct((batch, seq, cfg.llm.width), jnp.float32),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32), jax.ShapeDtypeStruct((batch, seq), bool))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    m = compiled.memory_analysis()
    out = {"program": "text loss", "text_positions": text_positions, "remat": False, "batch": batch, "seq": seq,
           "vocab": RELEASE_VOCAB, "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
           "compile_s": time.perf_counter() - t0}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _module_from_rev(rev: str, path: str, name: str):
    """The module at ``path`` as of git revision ``rev`` (None outside a checkout or for an unknown rev)."""
    import importlib.util
    import subprocess
    import tempfile

    try:
        src = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = tempfile.mkdtemp(prefix="bench_rev_")
    file = os.path.join(folder, os.path.basename(path))
    with open(file, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def host_collectives(checkpoint_mod, lm_train_mod, steps: int = 100) -> dict:
    """Host collectives (``process_allgather`` calls) of the LM loop's per-step host logic over ``steps`` steps,
    as if in 2 processes: the checkpoint policy / stop decision (``TrainCheckpointer.after_step``, a stub orbax
    manager that never saves) and the batch shapes (``agreed_sizes`` of the old loop, ``planned_sizes`` now), with
    length buckets (no fixed ``data.seq_len``)."""
    from jax.experimental import multihost_utils

    calls = {"n": 0}

    def gather(x, tiled=False):
        calls["n"] += 1
        x = np.asarray(x)
        return np.concatenate([x, x]) if tiled else np.stack([x, x])

    class Manager:
        def all_steps(self):
            return []

        def save(self, *a, **k):
            return False

        def reached_preemption(self, step):
            return False

        def wait_until_finished(self):
            pass

    ck = object.__new__(checkpoint_mod.TrainCheckpointer)
    ck.manager, ck.directory, ck.host_collectives = Manager(), "/nonexistent", 0
    ck.preemption_check_every = 10  # the config default (the old class has no such attribute)

    class Flag:
        requested = False

    examples = [{"input_ids": np.zeros(100 + 7 * i, np.int32), "num_patches": 20 + i} for i in range(4)]
    saved = jax.process_count, multihost_utils.process_allgather
    jax.process_count, multihost_utils.process_allgather = (lambda: 2), gather
    try:
        for step in range(1, steps + 1):
            if hasattr(lm_train_mod, "agreed_sizes"):
                lm_train_mod.agreed_sizes(examples, 0, 0)
            else:
                lm_train_mod.planned_sizes(40, 25, 0, 0)
            ck.after_step(step, {}, {}, preempt=Flag(), stop_after=None, start=0, total=steps + 1,
                          say=lambda *a, **k: None)
    finally:
        jax.process_count, multihost_utils.process_allgather = saved
    return {"steps": steps, "collectives": calls["n"], "per_step": calls["n"] / steps}


def issue18(quick: bool, baseline_rev: str) -> dict:
    what = "the text loss (LM head + CE, value and gradients)" if quick else "LM step"
    print(f"\n{what}, compiled peak memory per device (XLA memory analysis, abstract arrays, 1 device): "
          f"configs/lm.py:tiny LLM with the release vocabulary ({RELEASE_VOCAB:,}), batch 8 x 512, float32")
    variants = [(0, False), (128, False)] + ([] if quick else [(128, True)])
    mem = []
    print(f"{'text logits':<26} {'remat':<5} {'peak MiB':>9} {'temp MiB':>9} {'args MiB':>9} {'compile s':>9}")
    for positions, remat in variants:
        r = text_loss_memory(positions) if quick else {"program": "lm step", **lm_step_memory(positions, remat)}
        mem.append(r)
        what = "every position" if positions == 0 else f"labelled ({positions} a row)"
        print(f"{what:<26} {str(remat):<5} {r['peak'] / 2**20:>9.1f} {r['temp'] / 2**20:>9.1f} "
              f"{r['argument'] / 2**20:>9.1f} {r['compile_s']:>9.1f}", flush=True)
    from unitok_jax.training import checkpoint as checkpoint_now
    from unitok_jax.training import lm_train as lm_train_now

    coll = {"after": host_collectives(checkpoint_now, lm_train_now)}
    old_ck = _module_from_rev(baseline_rev, "unitok_jax/training/checkpoint.py", "_old_checkpoint")
    old_lm = _module_from_rev(baseline_rev, "unitok_jax/training/lm_train.py", "_old_lm_train")
    if old_ck is not None and old_lm is not None:
        coll["before"] = {**host_collectives(old_ck, old_lm), "rev": baseline_rev}
    print("\nhost collectives per step, 2 processes, length buckets, 100 steps (process_allgather calls):")
    for k in ("before", "after"):
        if k in coll:
            print(f"  {k:<6} {coll[k]['per_step']:.2f} per step ({coll[k]['collectives']} in {coll[k]['steps']})"
                  + (f", code of {coll[k]['rev']}" if "rev" in coll[k] else ""))
    return {"lm_step_memory": mem, "host_collectives": coll}


def time_steps_of(stage, todos: list) -> dict:
    """Train steps of the first batches of a plan, each batch shape compiled first (not timed): real (non-padding)
    tokens per second and ms per step."""
    state = stage.init_state()
    seen = set()
    for t in todos:
        shape = tuple((k, v.shape) for k, v in sorted(t.batch.items()))
        if shape not in seen:
            seen.add(shape)
            state, m = t.fn(state, t.batch)
            jax.block_until_ready(m)
    t0 = time.perf_counter()
    real = 0.0
    for t in todos:
        state, m = t.fn(state, t.batch)
        real += float(np.sum(np.asarray(t.batch["valid"])))
    jax.block_until_ready(state)
    dt = time.perf_counter() - t0
    return {"timed_steps": len(todos), "step_ms": 1000 * dt / len(todos), "real_tokens_per_s": real / dt}


def lm_plan(workdir: str, quick: bool, pack_shape: tuple = (0, 256, 96), time_steps: int = 0) -> dict:
    """The LM stage's batches of a run, built as its training loop builds them (``LMStage.next_step``, from the
    run's ``config.json``; no training step): compiled step programs (distinct batch shapes), padding fraction and
    host milliseconds per step, for the run's length buckets and for one fixed shape (``data.seq_len`` /
    ``data.max_patches`` at the largest bucket the plan used), over the run's steps (the first 200 with
    ``quick``). The host share of a step divides the host time by the median ``step_s`` the run logged."""
    import statistics as st
    import tempfile

    from unitok_jax.training import loop
    from unitok_jax.training.lm_train import LMStage

    config = loop.load_config(workdir)
    steps = min(int(config.train.steps), 200) if quick else int(config.train.steps)
    logged = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))] if os.path.isfile(
        os.path.join(workdir, "metrics.jsonl")) else []
    step_s = st.median([r["step_s"] for r in logged if "step_s" in r]) if any("step_s" in r for r in logged) else None

    def plan(cfg_overrides: dict) -> dict:
        c = config.copy_and_resolve_references()
        for k, v in cfg_overrides.items():
            section, key = k.split(".")
            c[section][key] = v
        with tempfile.TemporaryDirectory() as tmp:
            tok_dir = os.path.join(workdir, "tokenizer")
            if not c.tokenizer.path and os.path.isdir(tok_dir):
                c.tokenizer.path = tok_dir  # the run's own tokenizer (nothing is written to its workdir)
            stage = LMStage(c, tmp)
            if c.data.source == "audio":
                stage.begin(stage.init_state())
            shapes, padding, host, seqs, todos = set(), [], [], [], []
            for step in range(steps):
                t0 = time.perf_counter()
                todo = stage.next_step(step)
                host.append(time.perf_counter() - t0)
                if step < time_steps:
                    todos.append(todo)
                b = todo.batch
                shapes.add(tuple((k, v.shape) for k, v in sorted(b.items())))
                valid = np.asarray(b["valid"])
                padding.append(1.0 - float(np.mean(valid)))
                seqs.append(sum(len(np.unique(r[r > 0])) for r in np.asarray(b["segment_ids"]))
                            if "segment_ids" in b else int(np.sum(valid.any(axis=1))))
            timed = time_steps_of(stage, todos) if todos else {}
        dims = sorted({(dict(sh)["input_ids"][1], dict(sh)["latents"][1] // stage.cfg.patch_size) for sh in shapes})
        return {**timed, "steps": steps, "compiled_programs": len(shapes), "padding_fraction": float(np.mean(padding)),
                "host_ms_per_step": 1000 * float(np.median(host)), "rows_skipped": stage.bad_records,
                "sequences_per_step": float(np.mean(seqs)), "rows": int(c.data.batch_size),
                "shapes": [list(d) for d in dims]}

    buckets = plan({})
    seq, patches = (max(d[i] for d in buckets["shapes"]) for i in (0, 1))
    fixed = plan({"data.seq_len": seq, "data.max_patches": patches})
    # packed: pack_shape = (rows, tokens, patches) of a packed batch (rows 0: the run's batch size)
    rows, pack_seq, pack_patches = pack_shape
    rows = rows or int(config.data.batch_size)
    packed = plan({"data.pack": True, "data.seq_len": pack_seq, "data.max_patches": pack_patches,
                   "data.batch_size": rows}) if config.data.source == "latents" else None
    main = packed or buckets
    out = {"workdir": workdir, "logged_step_s": step_s, "buckets": buckets, "fixed": fixed, "packed": packed,
           # the host's share of a step: of the run's median logged step, else of this bench's timed steps
           "host_wait_fraction": (main["host_ms_per_step"] / 1000 / step_s) if step_s else (
               main["host_ms_per_step"] / main["step_ms"] if "step_ms" in main else None),
           "compiled_programs": main["compiled_programs"], "padding_fraction": main["padding_fraction"],
           "of": "packed" if packed else "buckets"}
    print(f"\nLM stage batches of {workdir} ({steps} steps, as its loop builds them; no training step):")
    print(f"{'shapes':<36} {'programs':>8} {'padding':>8} {'seqs/step':>9} {'host ms/step':>12} {'rows skipped':>12}"
          + (f" {'step ms':>8} {'real tok/s':>10}" if time_steps else ""))
    cases = [("length buckets (as trained)", buckets), (f"fixed {seq} x {patches} patches", fixed)]
    if packed:
        cases.append((f"packed: {rows} x {pack_seq} tok / {pack_patches} patches", packed))
    for name, r in cases:
        timed = (f" {r['step_ms']:>8.0f} {r['real_tokens_per_s']:>10.0f}" if "step_ms" in r else "")
        print(f"{name:<36} {r['compiled_programs']:>8} {r['padding_fraction']:>8.1%} {r['sequences_per_step']:>9.1f} "
              f"{r['host_ms_per_step']:>12.1f} {r['rows_skipped']:>12}{timed}")
    if out["host_wait_fraction"] is not None:
        of = f"the run's median logged step ({step_s * 1000:.0f} ms)" if step_s else "a timed step"
        print(f"host share of {of}, {out['of']}: {out['host_wait_fraction']:.1%} (an upper bound of the device's "
              "wait: async dispatch overlaps it)")
    for name, r in (("fixed shape", fixed), ("packed", packed)):
        if r:
            speed = (f", real tokens/s {r['real_tokens_per_s'] / buckets['real_tokens_per_s']:.2f}x"
                     if "real_tokens_per_s" in r else "")
            print(f"{name} vs buckets: {r['compiled_programs']} vs {buckets['compiled_programs']} programs, padding "
                  f"{r['padding_fraction'] / max(buckets['padding_fraction'], 1e-9):.2f}x{speed}")
            if speed:
                ratio = r["real_tokens_per_s"] / buckets["real_tokens_per_s"]
                out[f"{name.split()[0]}_vs_buckets_tokens_per_s"] = ratio
    return out


# ------------------------------------------------------------------------------------------------ main


def fmt(v, spec, na="n/a"):
    return na if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (< 2 min on 2 CPU cores)")
    ap.add_argument("--sizes", help="comma-separated from tiny,small,demo (the sizes make demo trains), or none (default: tiny with --quick, else "
                    "tiny,small)")
    ap.add_argument("--official", action="store_true", help="also count the official-size LM step's FLOPs")
    ap.add_argument("--official-batch", type=int, default=8)
    ap.add_argument("--official-frames", type=int, default=1000, help="latent frames per row (50 per second)")
    ap.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU (default: from the table)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--no-issue18", action="store_true", help="skip the LM step memory / host collectives section")
    ap.add_argument("--pack-shape", default="0x256x96", metavar="ROWSxTOKENSxPATCHES",
                    help="--lm-plan's packed batch (rows 0: the run's batch size; default 0x256x96)")
    ap.add_argument("--lm-plan-steps", type=int, default=0, metavar="N",
                    help="with --lm-plan: also run N train steps of each plan (every shape compiled first) and report "
                         "real tokens/s (minutes on CPU)")
    ap.add_argument("--lm-plan", metavar="WORKDIR",
                    help="an LM-stage workdir (e.g. make demo's demo/work/lm): its batches' compiled programs, "
                         "padding and host time per step, buckets vs one fixed shape")
    ap.add_argument("--baseline-rev", default="a002946",
                    help="git revision whose loop code is the 'before' of the host collectives count")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 throughout, like the other benchmarks
    warnings.filterwarnings("ignore", message=".*donated buffers.*")

    sizes = (args.sizes or ("tiny" if args.quick else "tiny,small")).split(",")
    sizes = [x for x in sizes if x not in ("", "none")]  # --sizes none: only --official
    if "small" in sizes and small_config() is None:
        print(f"note: {SMALL} not found, skipping the small size", file=sys.stderr)
        sizes = [s for s in sizes if s != "small"]
    budget, lo, hi = (1.0, 3, 6) if args.quick else (6.0, 5, 30)
    impls = ("auto", "dense") if args.quick else ("auto", "dense", "tiled", "ragged")
    dev = jax.devices()[0]
    n_dev = jax.device_count()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else monitor.peak_flops_per_device(dev, "float32")

    print(f"Train step, float32, random weights; device {dev.platform} ({dev.device_kind}) x{n_dev}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}; peak {fmt(peak and peak / 1e12, '.1f')} TFLOP/s/device")
    header = (f"{'stage':<5} {'size':<5} {'moe':<11} {'B':>2} {'shape':>7} {'Mparam':>7} {'compile s':>9} "
              f"{'step ms':>9} {'units/s':>9} {'unit':<9} {'XLA GF':>8} {'matmul GF':>9} {'GFLOP/s':>8} {'MFU':>5}")
    if sizes:
        print(header)
        print("-" * len(header))
    rows = []

    def emit(r):
        rows.append(r)
        print(f"{r['stage']:<5} {r['size']:<5} {r['impl']:<11} {r['batch']:>2} {r['shape']:>7} {r['params_M']:>7.2f} "
              f"{r['compile_s']:>9.1f} {r['step_ms']:>9.1f} {r['units_per_s']:>9.1f} {r['unit']:<9} "
              f"{fmt(r['xla_flops'] and r['xla_flops'] / 1e9, '8.2f'):>8} {r['matmul_flops'] / 1e9:>9.2f} "
              f"{r['achieved_flops_per_s'] / 1e9:>8.1f} {fmt(r['mfu'] and 100 * r['mfu'], '4.1f'):>5}", flush=True)

    comparisons = {}
    for size in sizes:
        batch = 4
        if size == "small":
            kwargs = small_config()["audio_tokenizer_config"]
        else:
            cfg = vae_configs.get_config("tiny")
            if size == "demo":  # the VAE `make demo` trains (demo.VAE_H128) at its recipe's batch
                cfg.update_from_flattened_dict(demo.VAE_H128)
                batch = demo.FULL_VAE["data.batch_size"]
            kwargs = cfg.vae.to_dict()
        cases = [vae_case(size, kwargs, batch, 1.0, DiscConfig.tiny(), gan=g) for g in (True, False)]
        time_cases(cases, budget, lo, hi)
        gan_row, lean_row = [c.row(peak, n_dev) for c in cases]
        emit(gan_row)
        emit(lean_row)
        comparisons[f"vae_mel_kl_vs_gan/{size}"] = {
            "gan_step_ms": gan_row["step_ms"], "mel_kl_step_ms": lean_row["step_ms"],
            "speedup": gan_row["step_ms"] / lean_row["step_ms"]}
        del cases

    for size in sizes:
        conf, tok, frames, batch = lm_setup(size)
        cases = [lm_case(size, impl, conf, tok, frames, batch) for impl in impls]
        time_cases(cases, budget, lo, hi)
        lm_rows = [c.row(peak, n_dev) for c in cases]
        for r in lm_rows:
            emit(r)
        grouped, dense = lm_rows[0], lm_rows[1]
        comparisons[f"grouped_vs_dense/{size}"] = {
            "grouped": grouped["impl"], "grouped_step_ms": grouped["step_ms"], "dense_step_ms": dense["step_ms"],
            "speedup": dense["step_ms"] / grouped["step_ms"],
            "matmul_flops_ratio": dense["matmul_flops"] / grouped["matmul_flops"]}
        del cases

    if rows:
        print("\nunits/s: seconds of audio (vae) or real, non-padding tokens (lm) per second; step ms: median of "
              "interleaved repeats;\nXLA GF: cost analysis of the compiled step (loop bodies counted once); "
              "matmul GF: matrix-product FLOPs of the traced step with loop trip counts (global; the looped / tiled "
              "MoE forms count their padded worst-case tiles); GFLOP/s and MFU from matmul GF.")
        print()
        print(f"{'comparison':<24} {'grouped':<12} {'grouped ms':>10} {'dense ms':>10} {'dense/grouped':>13} "
              f"{'FLOPs ratio':>11}")
        for key, c in comparisons.items():
            if key.startswith("vae_"):
                continue
            print(f"{key:<24} {c['grouped']:<12} {c['grouped_step_ms']:>10.1f} {c['dense_step_ms']:>10.1f} "
                  f"{c['speedup']:>13.2f} {c['matmul_flops_ratio']:>11.2f}")

        print(f"\n{'comparison':<24} {'GAN step ms':>11} {'mel+KL step ms':>14} {'GAN / mel+KL':>12}")
        for key, c in comparisons.items():
            if key.startswith("vae_"):
                print(f"{key:<24} {c['gan_step_ms']:>11.1f} {c['mel_kl_step_ms']:>14.1f} {c['speedup']:>12.2f}")

    official = None
    if args.official:
        official = official_lm(args.official_batch, args.official_frames)
        o = official
        print(f"\nofficial LM train step ({o['llm_params_B']:.1f} B LLM params, {o['dtype']}, MoE {o['impl']}), "
              f"batch {o['batch']} x {o['seq']} tokens ({o['valid_tokens']} real, {o['patches']} audio patches), "
              f"abstract inputs:\n  matmul FLOPs/step {o['matmul_flops'] / 1e12:.2f} T "
              f"({o['flops_per_padded_token'] / 1e9:.2f} GFLOP per position; traced in {o['trace_s']:.1f} s); the "
              f"LLM alone, 6N + attention estimate: {o['llm_6n_flops'] / 1e12:.2f} T;\n  XLA:CPU cost analysis "
              f"{fmt(o['xla_cpu_flops'] and o['xla_cpu_flops'] / 1e12, '.2f')} T (compiled in "
              f"{o['cpu_compile_s']:.1f} s; layer loops counted once, ragged_dot as a dense product over all "
              f"experts on CPU: not the GPU count);\n  one step at 100 % of an H100's dense bf16 peak: "
              f"{o['h100_bf16_step_ms_at_peak']:.1f} ms")

    i18 = None if args.no_issue18 else issue18(args.quick, args.baseline_rev)
    plan = lm_plan(args.lm_plan, args.quick, tuple(int(x) for x in args.pack_shape.split("x")),
                   args.lm_plan_steps) if args.lm_plan else None

    if args.json:
        out = {"benchmark": "train", "issue18": i18, "quick": args.quick, "sizes": sizes, "lm_plan": plan,
               **({k: plan[k] for k in ("host_wait_fraction", "compiled_programs", "padding_fraction")}
                  if plan else {}),
               "environment": {"jax": jax.__version__, "platform": dev.platform, "device_kind": dev.device_kind,
                               "device_count": n_dev, "cpu_count": os.cpu_count(),
                               "python": platform.python_version(), "machine": platform.machine(),
                               "peak_flops_per_device": peak},
               "rows": rows, "comparisons": comparisons, "official": official}
        write_json(args.json, out, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
