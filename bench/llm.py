#!/usr/bin/env python
"""BailingMoE LLM speed: prefill tokens/s and decode steps/s (KV cache), with compile time reported separately,
plus the compiled FLOPs per token next to the analytic count from the active parameters. Random weights.

Sizes: ``tiny`` (TINY_LLM_CONFIG: 64 wide, 2 layers, 8 experts top-2) and ``small`` (the LLM of
``../shared/perf/small/config.json``: 512 wide, 6 layers, 16 experts top-2 + 1 shared, vocab 4096), batch 1 and 16
(small: 1, 8 after a 40-position prompt, the TTS loop's decode, and in the full run 16).
Comparisons measured in the same run (interleaved repeats):

* ``grouped vs dense``: the dropless sorted grouped-matmul MoE (``moe_impl="auto"``: the looped tile form on CPU,
  ragged_dot on TPU/GPU) vs the dense reference path (every expert on every token), same weights and inputs
  (the full run adds rows for the batched "tiled" form and for ``jax.lax.ragged_dot``, which XLA:CPU lowers to a
  masked product over all experts);
* ``stacked vs sliced``: inference's MoE read (``prefill`` / ``decode_step``: each tile's expert read out of the
  layer-stacked weights, ``stacked_experts=True``) vs the per-layer params of the layer scan (``"sliced"``, what a
  training forward uses: on CPU XLA copies each layer's slice before the expert loop), same impl ``"auto"``;
* ``vs reference``: the small config at batch 1 against the PyTorch reference's raw runs, read through
  ``bench/reference.py`` (mean of the runs' medians of ``llm_prefill_200_b1``, the 200-position prefill, and of
  ``tts_step_b1.llm``, the LLM part of a TTS step: one position with a cache of ~60); "n/a" where absent.

How close to the limit: achieved GFLOP/s (the analytic count below: active parameters + causal attention) next to a
float32 matmul peak measured in the same run (``bench/peak.py``), as "% of peak".

Usage: ``python bench/llm.py [--quick] [--json PATH]`` (``--quick``: fewer rows and repeats, < 2 min on 2 cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import peak  # noqa: E402
import reference  # noqa: E402

from unitok_jax.configs.llm import TINY_LLM_CONFIG  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402
from unitok_jax.llm import (  # noqa: E402
    BailingMoeLM,
    LLMConfig,
    decode_step,
    generate,
    init_cache,
    prefill,
    random_params,
)

PERF = REPO.parent / "shared" / "perf" / "small"
SMALL_FALLBACK = {**TINY_LLM_CONFIG, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536,
                  "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
                  "rope_theta": 600000.0, "num_experts": 16, "num_shared_experts": 1, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 512, "multi_gate": True}


def small_llm_config() -> dict:
    path = PERF / "config.json"
    if not path.is_file():
        return SMALL_FALLBACK
    return json.loads(path.read_text())["llm_config"]


# our comparison -> the reference's key path (reference.value: mean of the runs' medians, ms)
REFERENCE_KEYS = {
    "prefill_200": ("llm_prefill_200_b1",),  # BailingMoE forward of 200 positions, batch 1
    "step_after_60": ("tts_step_b1", "llm"),  # the LLM part of a TTS step: 1 position, cache of ~60
}


def analytic_flops_per_token(cfg: LLMConfig, context: int) -> dict:
    """2 x active matmul parameters per token, plus attention scores/values over ``context`` keys."""
    d, n, k, hd = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * (n + 2 * k) * hd + n * hd * d
    moe = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
    moe += 3 * d * (cfg.shared_dim or 0)
    active = cfg.num_moe_layers * (attn + moe) + cfg.num_dense_layers * (attn + 3 * d * cfg.mlp_dim)
    active += d * cfg.vocab_size
    attention = cfg.num_layers * 4 * context * n * hd
    return {"active_params_M": active / 1e6, "param_flops": 2 * active, "attention_flops": attention,
            "total": 2 * active + attention}


class Case:
    """Compiled prefill and decode-step calls for one config / MoE impl / batch size."""

    def __init__(self, hf: dict, impl: str, batch: int, prompt: int, steps: int, seed: int = 0, **overrides):
        # "sliced": impl "auto" with the per-layer expert params (stacked_experts=False)
        stacked = impl != "sliced"
        self.cfg = LLMConfig.from_hf(hf, moe_impl="auto" if impl == "sliced" else impl, **overrides)
        self.model = BailingMoeLM(self.cfg)
        self.params = jax.tree.map(jnp.asarray, random_params(self.cfg, seed))
        self.batch, self.prompt = batch, prompt
        rng = np.random.default_rng(seed + 1)
        self.embeds = jnp.asarray(rng.standard_normal((batch, prompt, self.cfg.width)), jnp.float32)
        self.step_embeds = jnp.asarray(rng.standard_normal((batch, 1, self.cfg.width)), jnp.float32)
        self.size = prompt + steps + 8
        model = self.model

        def pre(p, c, x):
            return prefill(model, p, c, inputs_embeds=x, stacked_experts=stacked)

        def step(p, c, x):
            logits, hidden, c = decode_step(model, p, c, inputs_embeds=x, stacked_experts=stacked)
            return logits, hidden, c

        cache = init_cache(self.cfg, batch, self.size)
        t0 = time.perf_counter()
        self.pre = jax.jit(pre).lower(self.params, cache, self.embeds).compile()
        self.compile_prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.step = jax.jit(step, donate_argnums=(1,)).lower(self.params, cache, self.step_embeds).compile()
        self.compile_step_s = time.perf_counter() - t0
        self.reset()

    def reset(self):
        self.cache = self.run_prefill()[2]

    def run_prefill(self):
        out = self.pre(self.params, init_cache(self.cfg, self.batch, self.size), self.embeds)
        jax.block_until_ready(out)
        return out

    def run_step(self):
        if int(self.cache["length"][0]) >= self.size - 1:
            self.reset()
        logits, _, self.cache = self.step(self.params, self.cache, self.step_embeds)
        logits.block_until_ready()


def prefill_flops(cfg: LLMConfig, batch: int, prompt: int) -> float:
    """Analytic FLOPs of a ``prompt``-position prefill: the active parameters at every position except the LM head,
    which :func:`prefill` applies at each row's last position only, plus causal attention (position i attends to i
    keys: the useful work, not the masked square a dense kernel may compute)."""
    per = analytic_flops_per_token(cfg, 0)
    head = 2 * cfg.width * cfg.vocab_size
    causal = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * prompt * (prompt + 1) / 2
    return batch * (prompt * (per["param_flops"] - head) + head + causal)


def step_flops(cfg: LLMConfig, batch: int, context: int) -> float:
    """Analytic FLOPs of one cached decode step (every parameter once, LM head included, attention over ``context``
    keys) for ``batch`` rows."""
    return batch * analytic_flops_per_token(cfg, context)["total"]


def compiled_flops_per_token(hf: dict, impl: str, batch: int, prompt: int) -> float:
    """XLA's cost analysis of the prefill, per token. XLA counts a loop body once (the layer scan, and the "loop"
    MoE), so this compiles a 1-layer model with the "tiled" MoE layout for the grouped forms ("dense" and "ragged"
    as they are) and scales the layer part by the depth: C1 + (L - 1) (C1 - lm_head)."""
    cfg = LLMConfig.from_hf(hf, moe_impl=impl if impl in ("dense", "ragged") else "tiled")
    one = dataclasses.replace(cfg, num_layers=1, first_k_dense_replace=0)
    model = BailingMoeLM(one)
    params = jax.eval_shape(lambda: random_params(one, 0))
    x = jax.ShapeDtypeStruct((batch, prompt, cfg.width), jnp.float32)
    cache = jax.eval_shape(lambda: init_cache(one, batch, prompt))
    c = jax.jit(lambda p, c, x: prefill(model, p, c, inputs_embeds=x, stacked_experts=False)).lower(
        params, cache, x).compile()
    c1 = peak.xla_flops(c)  # cost_analysis() is a dict or a list of dicts depending on the jax version
    if c1 is None:
        return float("nan")
    head = 2 * batch * cfg.width * cfg.vocab_size  # logits at the last position only
    return (c1 + (cfg.num_layers - 1) * (c1 - head)) / (batch * prompt)


def _time(fns, budget_s: float, lo: int, hi: int) -> list[list[float]]:
    """Interleaved repeats of several callables (machine noise hits them alike); seconds per call."""
    for f in fns:  # warm-up
        f()
    times = [[] for _ in fns]
    start = time.perf_counter()
    i = 0
    while i < lo or (i < hi and time.perf_counter() - start < budget_s * len(fns)):
        for f, ts in zip(fns, times):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        i += 1
    return times


def _stats(ts):
    return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "repeats": len(ts)}


def run_pair(name: str, hf: dict, batch: int, prompt: int, budget: float, lo: int, hi: int, impls,
             peak_gflops: float) -> list[dict]:
    """Rows for each impl of one (config, batch): prefill and step times measured interleaved across impls, with the
    achieved GFLOP/s of each (analytic FLOPs of the active parameters, so the dense path, which computes every
    expert, shows the useful rate, not the hardware's) and its share of the same-run matmul peak."""
    cases = {impl: Case(hf, impl, batch, prompt, hi + 4) for impl in impls}
    pre_t = _time([c.run_prefill for c in cases.values()], budget, lo, hi)
    step_t = _time([c.run_step for c in cases.values()], budget, lo, hi)
    rows = []
    for (impl, c), pt, st in zip(cases.items(), pre_t, step_t):
        an = analytic_flops_per_token(c.cfg, prompt)
        p, s = _stats(pt), _stats(st)
        # the step's context grows from `prompt` as run_step repeats (reset before the cache is full): its start
        p.update(peak.achieved(prefill_flops(c.cfg, batch, prompt), p["median_ms"] / 1e3, peak_gflops))
        s.update(peak.achieved(step_flops(c.cfg, batch, prompt + 1), s["median_ms"] / 1e3, peak_gflops))
        rows.append({
            "config": name, "impl": impl, "batch": batch, "prompt": prompt,
            "compile_prefill_s": c.compile_prefill_s, "compile_step_s": c.compile_step_s,
            "prefill": p, "step": s,
            "prefill_tokens_per_s": batch * prompt / (p["median_ms"] / 1e3),
            "decode_steps_per_s": 1e3 / s["median_ms"],
            "decode_tokens_per_s": batch * 1e3 / s["median_ms"],
            "flops_per_token_compiled": compiled_flops_per_token(hf, impl, batch, prompt),
            "prefill_xla_flops_loops_once": peak.xla_flops(c.pre),  # loop bodies (layer scan, MoE loop) once
            "flops_per_token_analytic": an["total"],
            "active_params_M": an["active_params_M"],
        })
    return rows


def while_loop_steps_per_s(hf: dict, batch: int, prompt: int, new: int, budget: float, lo: int, hi: int) -> dict:
    """Greedy generation entirely on device (lax.while_loop of decode steps): steps per second."""
    cfg = LLMConfig.from_hf(hf)
    model = BailingMoeLM(cfg)
    params = jax.tree.map(jnp.asarray, random_params(cfg, 0))
    ids = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (batch, prompt)), jnp.int32)
    lengths = jnp.full((batch,), prompt, jnp.int32)
    fn = jax.jit(lambda p, x, n: generate(model, p, x, n, new)).lower(params, ids, lengths).compile()
    pre = jax.jit(lambda p, x, n: prefill(model, p, init_cache(cfg, batch, prompt + new), input_ids=x,
                                          lengths=n)).lower(params, ids, lengths).compile()
    gen_t, pre_t = _time([lambda: jax.block_until_ready(fn(params, ids, lengths)),
                          lambda: jax.block_until_ready(pre(params, ids, lengths))], budget, lo, hi)
    loop_s = statistics.median(gen_t) - statistics.median(pre_t)
    return {"batch": batch, "prompt": prompt, "new_tokens": new, "generate_median_ms": 1e3 * statistics.median(gen_t),
            "prefill_median_ms": 1e3 * statistics.median(pre_t), "steps_per_s": new / max(loop_s, 1e-9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset with few repeats (< 2 min on 2 CPU cores)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 throughout, like the reference timings

    budget, lo, hi = (0.8, 2, 8) if args.quick else (5.0, 3, 40)
    small = small_llm_config()
    # small at batch 8 after a 40-position prompt: the TTS loop's batch-8 decode step
    plan = [("tiny", TINY_LLM_CONFIG, 1, 64), ("tiny", TINY_LLM_CONFIG, 16, 64), ("small", small, 1, 200),
            ("small", small, 8, 40)]
    if not args.quick:
        plan += [("small", small, 16, 200)]
    impls = ("auto", "sliced", "dense") if args.quick else ("auto", "sliced", "dense", "tiled", "ragged")
    # measured first, in this process: the same machine load and XLA build as the timings below
    peak_gflops = peak.matmul_peak_gflops(quick=args.quick)

    print(f"BailingMoE LLM, float32, random weights; device {jax.devices()[0].platform} x{jax.device_count()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}; MoE 'auto' = "
          f"{'ragged_dot' if jax.default_backend() in ('tpu', 'gpu') else 'tile gather (decode) / tile loop (prefill)'}"
          f" here; "
          f"GFLOP/tok = XLA cost analysis of the prefill (tiled layout) vs analytic (2 x active params + attention); "
          f"GFLOP/s = analytic FLOPs / median time, % pk = of the same-run matmul peak")
    header = (f"{'config':<6} {'moe':<6} {'B':>3} {'T':>4} {'compile s':>9} {'prefill ms':>10} {'tok/s':>9} "
              f"{'GFLOP/s':>7} {'% pk':>5} {'step ms':>8} {'steps/s':>8} {'GFLOP/s':>7} {'% pk':>5} "
              f"{'GFLOP/tok':>9} {'analytic':>9} {'active M':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for name, hf, batch, prompt in plan:
        for r in run_pair(name, hf, batch, prompt, budget, lo, hi, impls, peak_gflops):
            rows.append(r)
            p, st = r["prefill"], r["step"]
            print(f"{r['config']:<6} {r['impl']:<6} {r['batch']:>3} {r['prompt']:>4} "
                  f"{r['compile_prefill_s'] + r['compile_step_s']:>9.2f} {p['median_ms']:>10.2f} "
                  f"{r['prefill_tokens_per_s']:>9.0f} {peak.fmt(p['gflop_s']):>7} {peak.fmt(p['pct_of_peak']):>5} "
                  f"{st['median_ms']:>8.2f} {r['decode_steps_per_s']:>8.1f} "
                  f"{peak.fmt(st['gflop_s']):>7} {peak.fmt(st['pct_of_peak']):>5} "
                  f"{r['flops_per_token_compiled'] / 1e9:>9.4f} {r['flops_per_token_analytic'] / 1e9:>9.4f} "
                  f"{r['active_params_M']:>8.2f}", flush=True)

    loops = [while_loop_steps_per_s(TINY_LLM_CONFIG, b, 16, 32, budget, lo, hi) for b in (1, 16)]
    print()
    for w in loops:
        print(f"tiny greedy generate (lax.while_loop), batch {w['batch']}: {w['new_tokens']} steps in "
              f"{w['generate_median_ms'] - w['prefill_median_ms']:.1f} ms -> {w['steps_per_s']:.0f} steps/s")

    comparisons = {}
    print()
    for name, batch, prompt in {(r["config"], r["batch"], r["prompt"]) for r in rows}:
        a = next(r for r in rows if (r["config"], r["batch"], r["impl"]) == (name, batch, "auto"))
        b = next(r for r in rows if (r["config"], r["batch"], r["impl"]) == (name, batch, "dense"))
        s = next(r for r in rows if (r["config"], r["batch"], r["impl"]) == (name, batch, "sliced"))
        for what in ("prefill", "step"):
            key = f"grouped_vs_dense/{name}/b{batch}/{what}"
            comparisons[key] = {"a_median_ms": a[what]["median_ms"], "b_median_ms": b[what]["median_ms"],
                                "speedup": b[what]["median_ms"] / a[what]["median_ms"],
                                "flops_ratio": b["flops_per_token_compiled"] / a["flops_per_token_compiled"]}
            comparisons[f"stacked_vs_sliced/{name}/b{batch}/{what}"] = {
                "a_median_ms": a[what]["median_ms"], "b_median_ms": s[what]["median_ms"],
                "speedup": s[what]["median_ms"] / a[what]["median_ms"]}
    # vs the reference: ours is always timed (the GFLOP/s stands without it); its figure is "n/a" where absent
    ours = next(r for r in rows if (r["config"], r["batch"], r["impl"]) == ("small", 1, "auto"))
    step60 = Case(small, "auto", 1, 60, hi + 4)
    (t,) = _time([step60.run_step], budget, lo, hi)
    step60_ms = 1e3 * statistics.median(t)
    mine = {"prefill_200": (ours["prefill"]["median_ms"], prefill_flops(step60.cfg, 1, 200)),
            "step_after_60": (step60_ms, step_flops(step60.cfg, 1, 61))}
    for what, (a_ms, flops) in mine.items():
        ref = reference.value(*REFERENCE_KEYS[what])
        comparisons[f"vs_reference/small/b1/{what}"] = {
            "a_median_ms": a_ms, "b_median_ms": ref, "speedup": None if ref is None else ref / a_ms,
            "reference_keys": ".".join(REFERENCE_KEYS[what]), **peak.achieved(flops, a_ms / 1e3, peak_gflops)}
    w = max(len(k) for k in comparisons)
    print(f"{'comparison':<{w}} {'A (ours) ms':>12} {'B ms':>10} {'B / A':>7}")
    for key in sorted(comparisons):
        c = comparisons[key]
        extra = f"   (dense/grouped compiled prefill FLOPs {c['flops_ratio']:.2f}x)" if "flops_ratio" in c else \
            "   (B = the per-layer expert params)" if key.startswith("stacked") else \
            (f"   (B = reference {c['reference_keys']}; ours {peak.fmt(c['gflop_s'])} GFLOP/s, "
             f"{peak.fmt(c['pct_of_peak'])} % of peak)")
        print(f"{key:<{w}} {c['a_median_ms']:>12.2f} {peak.fmt(c['b_median_ms'], '.2f'):>10} "
              f"{peak.fmt(c['speedup'], '.2f'):>7}{extra}")
    print()
    print(peak.describe_peak(peak_gflops, args.quick))
    print(reference.describe())

    if args.json:
        out = {
            "benchmark": "llm",
            "quick": args.quick,
            **peak.run_info(args.quick, peak_gflops),
            "configs": {"tiny": TINY_LLM_CONFIG, "small": small},
            "rows": rows,
            "while_loop": loops,
            "comparisons": comparisons,
        }
        write_json(args.json, out, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
