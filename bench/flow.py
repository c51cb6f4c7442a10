"""Flow-head sampler benchmark: patches sampled per second (10 steps, EPSS + sway, SDE noise, CFG on, random
weights), compile time reported separately, plus two comparisons measured in the same run:

* ``ref``: our sampler at the "small" configuration (``../shared/perf/small/config.json``: DiT 256 x 4, 4 heads,
  cond 512) at batch 1 vs the reference's ``FlowLoss.sample`` inside a TTS step (``tts_step_b1.flow_sample``: 10
  steps, CFG), read from its raw runs through ``bench/reference.py`` (mean of the runs' medians; "n/a" if absent);
* ``cfg``: guidance as ONE DiT call on the doubled batch (what :func:`unitok_jax.flow.sample` does) vs two separate
  DiT calls per step (conditional, then unconditional), same config, same batch.

How close to the limit: achieved GFLOP/s (matmul FLOPs of the traced sampler, its step loop and the DiT's block
scan times their trip counts, see ``bench/peak.py``) next to a float32 matmul peak measured in the same run.

Usage: ``python bench/flow.py [--quick] [--json PATH]``. ``--quick`` (< 2 min on 2 CPU cores) drops the released
size at batch 16 and 128 and uses fewer repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import peak  # noqa: E402
import reference  # noqa: E402
from unitok_jax import flow  # noqa: E402
from unitok_jax.flow import FlowConfig  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402

PERF = REPO.parent / "shared" / "perf" / "small"
STEPS = 10
CFG_SCALE = 2.0
# the reference's FlowLoss.sample (10 steps, CFG 2) inside one TTS step at batch 1 (reference.value key path)
REFERENCE_KEYS = ("tts_step_b1", "flow_sample")

CONFIGS = {
    # the public fixture set's DiT (flow_head.config.json)
    "tiny": FlowConfig(z_channels=64, llm_cond_dim=64, hidden_size=64, depth=2, num_heads=4, mlp_ratio=2.0),
    # shared/perf/small/config.json (ditar_config + latent 64 + LLM width 512)
    "small": FlowConfig(z_channels=64, llm_cond_dim=512, hidden_size=256, depth=4, num_heads=4, mlp_ratio=4.0),
    # the spec's estimate of the released head (H 1024, depth 8 -> ~104M params; the real dims come from config.json)
    "released": FlowConfig(z_channels=64, llm_cond_dim=2048, hidden_size=1024, depth=8, num_heads=16, mlp_ratio=4.0),
}


def small_config_from_perf() -> FlowConfig:
    path = PERF / "config.json"
    if not path.is_file():
        return CONFIGS["small"]
    with open(path) as f:
        c = json.load(f)
    kwargs = {"z_channels": c["audio_tokenizer_config"]["enc_kwargs"]["latent_dim"],
              "llm_cond_dim": c["llm_config"]["hidden_size"], **c["ditar_config"]}
    return FlowConfig.from_reference(kwargs, patch_size=c["audio_tokenizer_config"].get("patch_size", 5))


def two_call_sample(params, config, key, cond, history, steps=STEPS, cfg=CFG_SCALE, sigma=0.25, temperature=1.5,
                    sway=-1.0):
    """The same sampler with guidance from two separate DiT calls per step (the comparison baseline)."""
    n = cond.shape[0]
    shape = (n, config.patch_size, config.z_channels)
    k0, k1 = jax.random.split(key)
    x0 = jax.random.normal(k0, shape)
    eps = jax.random.normal(k1, (steps - 1,) + shape)
    grid = flow.time_grid(steps, True, sway)
    coef = sigma * jnp.sqrt(temperature)

    def body(x, k):
        t0, dt = grid[k], grid[k + 1] - grid[k]
        t = jnp.full((n,), t0)
        v_c = flow.dit_apply(params, config, x, t, cond, history)
        v_u = flow.dit_apply(params, config, x, t, jnp.zeros_like(cond), history)
        x = x + dt * (v_c + cfg * (v_c - v_u))
        noise = coef * jnp.sqrt(jnp.abs(dt)) * eps[jnp.minimum(k, steps - 2)]
        return x + jnp.where(k < steps - 1, noise, 0.0), None

    return jax.lax.scan(body, x0, jnp.arange(steps))[0]


def one_call_sample(params, config, key, cond, history):
    return flow.sample(params, config, key, cond, history, steps=STEPS, cfg=CFG_SCALE)


def _setup(fn, config: FlowConfig, batch: int):
    """(compiled call key -> output, compile seconds, params in millions) for one sampler at one batch size. The
    call carries ``flops`` (matmul FLOPs of the traced sampler, loops times their trip counts) and ``xla_flops``
    (XLA's cost analysis of the compiled program, which counts the step loop's and the block scan's bodies once)."""
    params = flow.init_dit(config, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 3)
    cond = jax.random.normal(k[0], (batch, 1, config.llm_cond_dim))
    hist = jax.random.normal(k[1], (batch, config.patch_size, config.z_channels))
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=1).lower(params, config, k[2], cond, hist).compile()
    compile_s = time.perf_counter() - t0
    run = lambda key: compiled(params, key, cond, hist).block_until_ready()  # noqa: E731
    t0 = time.perf_counter()
    run(k[2])  # warm-up
    run.warm_s = time.perf_counter() - t0
    run.flops = peak.traced_flops(lambda p, key, c, h: fn(p, config, key, c, h), params, k[2], cond, hist)
    run.xla_flops = peak.xla_flops(compiled)
    return run, compile_s, sum(x.size for x in jax.tree.leaves(params)) / 1e6


def _time(runs, budget_s: float, min_repeats: int, max_repeats: int) -> list[list[float]]:
    """Interleaved repeats of several runs (so machine noise hits them alike); seconds per repeat per run."""
    times = [[] for _ in runs]
    start = time.perf_counter()
    i = 0
    while i < min_repeats or (i < max_repeats and time.perf_counter() - start < budget_s * len(runs)):
        key = jax.random.key(100 + i)
        for run, ts in zip(runs, times):
            t = time.perf_counter()
            run(key)
            ts.append(time.perf_counter() - t)
        i += 1
    return times


def measure(fn, config: FlowConfig, batch: int, budget_s: float, min_repeats: int, max_repeats: int,
            peak_gflops: float) -> dict:
    run, compile_s, n_params = _setup(fn, config, batch)
    if run.warm_s > budget_s:  # one call already exceeds the budget (released size, big batch): fewer repeats
        min_repeats = 1
    (times,) = _time([run], budget_s, min_repeats, max_repeats)
    med = statistics.median(times)
    return {
        "batch": batch,
        "compile_s": compile_s,
        "median_ms": 1e3 * med,
        "min_ms": 1e3 * min(times),
        "repeats": len(times),
        "patches_per_s": batch / med,
        "params_M": n_params,
        "xla_flops_loops_once": run.xla_flops,
        **peak.achieved(run.flops, med, peak_gflops),
    }


def compare(fn_a, fn_b, config: FlowConfig, batch: int, budget_s: float, min_repeats: int, max_repeats: int) -> dict:
    """Median and min times of two samplers, measured interleaved in the same run; speedup = B / A."""
    run_a, _, _ = _setup(fn_a, config, batch)
    run_b, _, _ = _setup(fn_b, config, batch)
    ta, tb = _time([run_a, run_b], budget_s, min_repeats, max_repeats)
    a, b = statistics.median(ta), statistics.median(tb)
    return {"batch": batch, "a_median_ms": 1e3 * a, "b_median_ms": 1e3 * b, "a_min_ms": 1e3 * min(ta),
            "b_min_ms": 1e3 * min(tb), "repeats": len(ta), "speedup": b / a, "speedup_at_min": min(tb) / min(ta)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset with few repeats (< 2 min on 2 CPU cores)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")  # float32 throughout, like the reference timings

    budget, lo, hi = (1.5, 2, 10) if args.quick else (8.0, 3, 50)
    # measured first, in this process: the same machine load and XLA build as the timings below
    peak_gflops = peak.matmul_peak_gflops(quick=args.quick)
    configs = dict(CONFIGS, small=small_config_from_perf())
    plan = [("tiny", b) for b in (1, 16, 128)] + [("small", b) for b in (1, 16, 128)]
    plan += [("released", b) for b in ((1,) if args.quick else (1, 16, 128))]

    rows = []
    print(f"flow sampler: {STEPS} steps, EPSS + sway -1, sigma 0.25, tau 1.5, CFG {CFG_SCALE} (one doubled call); "
          f"device {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
    header = f"{'config':<9} {'params':>8} {'batch':>5} {'compile s':>9} {'median ms':>10} {'min ms':>9} " \
             f"{'n':>3} {'patches/s':>10} {'GFLOP':>8} {'GFLOP/s':>8} {'% of peak':>9}"
    print(header)
    print("-" * len(header))
    for name, batch in plan:
        r = measure(one_call_sample, configs[name], batch, budget, lo, hi, peak_gflops)
        r["config"] = name
        rows.append(r)
        print(f"{name:<9} {r['params_M']:>7.2f}M {batch:>5} {r['compile_s']:>9.2f} {r['median_ms']:>10.2f} "
              f"{r['min_ms']:>9.2f} {r['repeats']:>3} {r['patches_per_s']:>10.1f} {peak.fmt(r['gflops'], '.3f'):>8} "
              f"{peak.fmt(r['gflop_s']):>8} {peak.fmt(r['pct_of_peak']):>9}", flush=True)

    comparisons = {}
    ref_ms = reference.value(*REFERENCE_KEYS)
    ours = next(r for r in rows if r["config"] == "small" and r["batch"] == 1)
    comparisons["ref_small_b1"] = {
        "ours_median_ms": ours["median_ms"],
        "reference_median_ms": ref_ms,  # None when the reference runs are absent
        "speedup": None if ref_ms is None else ref_ms / ours["median_ms"],
        "reference_keys": ".".join(REFERENCE_KEYS),
        "gflop_s": ours["gflop_s"],
        "pct_of_peak": ours["pct_of_peak"],
    }
    for batch in (1, 16):
        comparisons[f"cfg_small_b{batch}"] = compare(one_call_sample, two_call_sample, configs["small"], batch,
                                                     budget, lo, hi)

    print()
    print(f"{'comparison':<16} {'A (ours) ms':>12} {'B ms':>10} {'B / A':>7}")
    c = comparisons["ref_small_b1"]
    print(f"{'vs reference':<16} {c['ours_median_ms']:>12.2f} {peak.fmt(c['reference_median_ms'], '.2f'):>10} "
          f"{peak.fmt(c['speedup'], '.2f'):>7}   (small config, batch 1; B = reference {c['reference_keys']}; ours "
          f"{peak.fmt(c['gflop_s'])} GFLOP/s, {peak.fmt(c['pct_of_peak'])} % of peak)")
    for batch in (1, 16):
        c = comparisons[f"cfg_small_b{batch}"]
        print(f"{'cfg one vs two':<16} {c['a_median_ms']:>12.2f} {c['b_median_ms']:>10.2f} {c['speedup']:>7.2f}   "
              f"(small config, batch {batch}, interleaved; B = two DiT calls per step; at min: "
              f"{c['speedup_at_min']:.2f})")
    print()
    print(peak.describe_peak(peak_gflops, args.quick) + "; GFLOP = matmul FLOPs of one sampler call (traced, loops "
          "times their trip counts; the CFG doubles the DiT batch)")
    print(reference.describe())

    if args.json:
        out = {
            "benchmark": "flow_sampler",
            "quick": args.quick,
            "steps": STEPS,
            "cfg": CFG_SCALE,
            **peak.run_info(args.quick, peak_gflops),
            "configs": {k: {"hidden_size": v.hidden_size, "depth": v.depth, "num_heads": v.num_heads,
                            "mlp_ratio": v.mlp_ratio, "llm_cond_dim": v.llm_cond_dim} for k, v in configs.items()},
            "rows": rows,
            "comparisons": comparisons,
        }
        write_json(args.json, out, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
