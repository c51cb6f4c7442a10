"""TTS generation benchmark at the tiny or the small configuration (random weights), one run, ratios in the same run
and to the PyTorch reference timed on this machine type (``bench/reference.py``):

* **mixed-length job**: ``--requests`` TTS requests (default 64) whose patch budgets spread over ``--spread``
  (default 10..80; the stop head forced off, so the budget decides), run three ways at the same row count
  (``--slots``, default 8): static batches in file order (each batch runs until its longest request ends, as a
  naive batcher does), static batches sorted by budget (what ``sample.py`` does without ``--slots``), and continuous
  batching (:func:`unitok_jax.generate.tts` with ``slots``: finished rows are refilled). Useful latent frames/s
  counts only frames that belong to a request; wall time is steady state (a second run), compile time apart;
* **step latency**: one jitted TTS step at batch 1 (whole step: LLM, flow sample with CFG, stop head, semantic
  module, pooling), against the reference's whole step;
* **equal-length throughput**: the compiled loop at batch 1, 8 and 32 (``--batches``) and a Python loop of the same
  jitted step at batch 1, latent frames/s, against the reference's 50-patch batch-1 loop;
* **streaming**: first-chunk latency of :func:`unitok_jax.generate.tts_stream` (``--chunk`` patches, after warm-up;
  its one compiled program per stream) at batch 1.

``--mesh data=2,fsdp=2,expert=2`` (or a preset) also runs the compiled loop SPMD on that mesh (params sharded by
:func:`unitok_jax.sharding.uniaudio_shardings`) against one device; on a CPU the mesh's devices are simulated on the
same cores, so the ratio shows what the partitioning costs, not a speed-up.

Usage: ``python bench/generate.py [--config tiny|small] [--mesh SPEC] [--quick] [--json PATH]``; ``--quick``
(< 2 min on 2 CPU cores) runs the tiny configuration with fewer patches and repeats, and keeps the mixed job.
With ``--json``: ``mixed_static_frames_per_s`` (file order), ``mixed_sorted_frames_per_s``,
``mixed_continuous_frames_per_s``, ``step_b1_ms``, ``rows`` (equal-length), ``stream_first_chunk_ms``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time


def _simulate_mesh_devices(argv) -> None:
    """Before jax starts: with ``--mesh`` on a CPU-only run, simulate as many host devices as the mesh needs."""
    spec = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--mesh"), None)
    spec = spec or next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), None)
    if not spec or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    from unitok_jax.sharding import MESH_PRESETS

    sizes = MESH_PRESETS.get(spec) or {k: int(v) for k, v in (x.split("=") for x in spec.split(",") if x)}
    n = math.prod(v for v in sizes.values() if v > 0)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}")


_simulate_mesh_devices(sys.argv[1:])

import jax  # noqa: E402
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from unitok_jax import generate as G  # noqa: E402
from unitok_jax import model  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402

PERF_SMALL = REPO.parent / "shared" / "perf" / "small" / "config.json"


def build_config(name: str) -> model.UniAudioConfig:
    if name == "tiny":
        c = copy.deepcopy(G.TINY_BAILINGMM)
        a = c["audio_tokenizer_config"]
        a["enc_kwargs"].update(input_dim=320, hop_size=320)
        a["dec_kwargs"].update(output_dim=320)
        return model.UniAudioConfig.from_bailingmm(c)
    if name == "small":
        with open(PERF_SMALL) as f:
            return model.UniAudioConfig.from_bailingmm(json.load(f))
    raise ValueError(f"unknown config {name!r}")


def make_requests(cfg, batch: int, text_len: int, prompt_patches: int, patches: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p, c = cfg.patch_size, cfg.vae.latent_dim
    ids = rng.integers(1, cfg.llm.vocab_size, (batch, text_len)).astype(np.int32)
    lengths = np.full((batch,), text_len, np.int32)
    prompt = rng.standard_normal((batch, prompt_patches * p, c)).astype(np.float32)
    return (ids, lengths, prompt, np.full((batch,), prompt_patches, np.int32), np.full((batch,), patches, np.int32))


def timed(fn, repeats: int):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return med, max(first - med, 0.0)


def mixed_job(cfg, n: int, lo: int, hi: int, seed: int = 3):
    """``n`` requests with text lengths 8..40, prompts of 2..8 patches and budgets uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    p, c = cfg.patch_size, cfg.vae.latent_dim
    lengths = rng.integers(8, 41, n).astype(np.int32)
    ids = rng.integers(1, cfg.llm.vocab_size, (n, int(lengths.max()))).astype(np.int32)
    pp = rng.integers(2, 9, n).astype(np.int32)
    prompt = rng.standard_normal((n, int(pp.max()) * p, c)).astype(np.float32)
    budgets = rng.integers(lo, hi + 1, n).astype(np.int32)
    return ids, lengths, prompt, pp, budgets


def run_static(params, cfg, job, order, slots: int, key, kw):
    ids, lengths, prompt, pp, budgets = job
    for i in range(0, len(order), slots):
        rows = order[i:i + slots]
        G.tts(params, cfg, ids[rows], lengths[rows], prompt[rows], pp[rows], budgets[rows], key,
              request_ids=rows, **kw)


def _loop_state(params, cfg, sampler, key, batch: int):
    """The TTS loop state after a 24-token text + 8-patch prompt prefill and 3 steps, at ``batch`` rows."""
    ids, lengths, prompt, pp, budgets = make_requests(cfg, batch, 24, 8, 64)
    job = G._tts_job(cfg, ids, lengths, prompt, pp, budgets, key, None, sampler, 0, 2.0, None, G.DEFAULT_BUCKETS)
    state = G.tts_init(params, cfg, **job.batch(np.arange(batch), batch, G._Mesh.of(None, None)), **job.statics)
    kw = dict(steps=sampler.steps, emit_stop_patch=True, guided=sampler.guided)
    for _ in range(3):
        state = G.tts_step(params, cfg, state, **kw)
    return jax.block_until_ready(state), kw


def _median_s(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_latency(params, cfg, sampler, key, repeats: int) -> float:
    """Median seconds of one jitted TTS step at batch 1 (state after a 24-token text + 8-patch prompt prefill)."""
    state, kw = _loop_state(params, cfg, sampler, key, 1)
    return _median_s(lambda: G.tts_step(params, cfg, state, **kw), repeats)


def step_parts(params, cfg, sampler, key, batch: int, repeats: int) -> dict:
    """Median ms of the pieces of one TTS step, each jitted alone on the same loop state (the reference's split:
    flow sample with the stop head, semantic module + pooling of the new patch, one LLM position)."""
    from unitok_jax import llm

    state, kw = _loop_state(params, cfg, sampler, key, batch)
    valid = np.ones((batch, cfg.patch_size), bool)
    flow = jax.jit(lambda pr, st: G._sample_and_stop(pr, cfg, st, sampler.steps, sampler.guided))
    sem = jax.jit(lambda pr, x, cache: model.audio_inputs(pr, cfg, x, cache, valid))
    pooled = np.zeros((batch, 1, cfg.llm.width), np.float32)
    active = np.ones((batch,), bool)
    dec = jax.jit(lambda pr, cache, e: llm.decode_step(model.llm_module(cfg), model.llm_vars(pr), cache,
                                                       inputs_embeds=e, active=active))
    parts = {"whole_step": lambda: G.tts_step(params, cfg, state, **kw),
             "flow_sample": lambda: flow(params, state),
             "unified_emb": lambda: sem(params, state.history, state.sem),
             "llm": lambda: dec(params, state.cache, pooled)}
    return {name: _median_s(fn, repeats) * 1000 for name, fn in parts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, choices=("tiny", "small"), help="default small (quick: tiny)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--patches", type=int, default=None, help="patches per equal-length request (default 50, quick 16)")
    ap.add_argument("--batches", default=None, help="equal-length batch sizes (default 1,8,32; quick 1,8)")
    ap.add_argument("--requests", type=int, default=64, help="requests of the mixed-length job")
    ap.add_argument("--spread", default=None, help="budget range of the mixed job, lo..hi (default 10..80)")
    ap.add_argument("--slots", type=int, default=8, help="rows of the mixed job (static batch size = slots)")
    ap.add_argument("--rounds", type=int, default=8, help="continuous batching: steps at most between refills")
    ap.add_argument("--chunk", type=int, default=4, help="streaming chunk, patches")
    ap.add_argument("--steps", type=int, default=10, help="flow sampler steps")
    ap.add_argument("--mesh", default=None, help="also run on this mesh (axis=size,... or a preset)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import reference  # bench/reference.py

    config = args.config or ("tiny" if args.quick else "small")
    patches = args.patches or (16 if args.quick else 50)
    repeats = 2 if args.quick else 3
    args.batches = args.batches or ("1,8" if args.quick else "1,8,32")
    lo, hi = (int(x) for x in (args.spread or "10..80").split(".."))
    cfg = build_config(config)
    params = model.init_params(cfg, jax.random.key(0))
    sampler = G.Sampler(steps=args.steps)
    p = cfg.patch_size
    frame_rate = cfg.vae.sample_rate / cfg.vae.hop
    kw = dict(sampler=sampler, stop_threshold=2.0, min_steps=0)
    key = jax.random.key(1)
    dev = jax.devices()[0]

    # --- mixed-length job: static (file order / sorted by budget) vs continuous, same rows
    job = mixed_job(cfg, args.requests, lo, hi)
    useful = int(job[4].sum()) * p
    file_order = np.arange(args.requests)
    by_budget = np.argsort(-job[4], kind="stable")
    mixed = {}
    fns = [lambda: run_static(params, cfg, job, file_order, args.slots, key, kw),
           lambda: run_static(params, cfg, job, by_budget, args.slots, key, kw),
           lambda: G.tts(params, cfg, *job, key, request_ids=file_order, slots=args.slots, rounds=args.rounds, **kw)]
    for name, fn in zip(("static, file order", "static, sorted by budget",
                         f"continuous ({args.slots} slots, rounds {args.rounds})"), fns):
        sec, comp = timed(fn, 1)
        mixed[name] = {"seconds": sec, "compile_s": comp, "frames_per_s": useful / sec}
    names = list(mixed)
    static_fps, sorted_fps, cont_fps = (mixed[n]["frames_per_s"] for n in names)
    # the device work of each, free of timing noise: loop steps (each a step of all rows) and prefill calls, counted
    # in an extra untimed run through wrappers of the jitted programs
    real_run, real_init = G.tts_run, G.tts_init
    counts = {"steps": 0, "prefills": 0}

    def counting_run(params, cfg, state, limit, free=None, **k):
        before = int(state.iter)
        state = real_run(params, cfg, state, limit, free, **k)
        counts["steps"] += int(state.iter) - before
        return state

    def counting_init(*a, **k):
        counts["prefills"] += 1
        return real_init(*a, **k)

    G.tts_run, G.tts_init = counting_run, counting_init
    try:
        for name, fn in zip(names, fns):
            counts.update(steps=0, prefills=0)
            fn()
            mixed[name].update(loop_steps=counts["steps"], prefills=counts["prefills"])
    finally:
        G.tts_run, G.tts_init = real_run, real_init

    # --- step latency, equal-length throughput
    step_s = step_latency(params, cfg, sampler, key, repeats)
    parts = {b: step_parts(params, cfg, sampler, key, b, repeats) for b in ((1,) if args.quick else (1, 8))}
    rows = []

    def record(mode, batch, sec, compile_s):
        frames = batch * patches * p
        rows.append({"mode": mode, "batch": batch, "patches": patches, "seconds": sec, "compile_s": compile_s,
                     "frames_per_s": frames / sec, "rtf": sec / (frames / frame_rate)})

    for b in [int(x) for x in args.batches.split(",")]:
        req = make_requests(cfg, b, 24, 8, patches)
        sec, comp = timed(lambda: G.tts(params, cfg, *req, key, **kw), repeats)
        record("compiled loop", b, sec, comp)
    req1 = make_requests(cfg, 1, 24, 8, patches)
    sec, comp = timed(lambda: G.tts(params, cfg, *req1, key, mode="python", **kw), repeats)
    record("python loop of jitted steps", 1, sec, comp)
    if args.mesh:
        from unitok_jax import sharding as shd

        mesh = shd.make_mesh({"mesh": shd.parse_mesh(args.mesh)})
        pm = jax.device_put(params, shd.uniaudio_shardings(cfg, jax.eval_shape(lambda: params), mesh,
                                                           shd.DEFAULT_RULES))
        for b in [int(x) for x in args.batches.split(",")]:
            req = make_requests(cfg, b, 24, 8, patches)
            sec, comp = timed(lambda: G.tts(pm, cfg, *req, key, mesh=mesh, **kw), repeats)
            record(f"compiled loop, mesh {args.mesh} ({mesh.devices.size} devices)", b, sec, comp)
    for r in rows:
        one = next((x for x in rows if x["mode"] == "compiled loop" and x["batch"] == r["batch"]), None)
        r["vs_one_device"] = r["frames_per_s"] / one["frames_per_s"] if one else None

    # --- streaming first chunk (batch 1; the stream's program is compiled by the warm-up)
    def first_chunk():
        t0 = time.perf_counter()
        gen = G.tts_stream(params, cfg, *req1, key, chunk_patches=args.chunk, **kw)
        next(gen)
        dt = time.perf_counter() - t0
        for _ in gen:
            pass
        return dt

    first_chunk()
    lat = statistics.median(first_chunk() for _ in range(repeats))

    # --- print
    small = config == "small"
    ref_step = reference.value("tts_step_b1", "whole_step") if small else None
    ref_fps = reference.value("tts_loop_50_b1", "latent_frames_per_s") if small else None
    print(f"# TTS generation, config={config}, device={dev.platform} ({dev.device_kind}), flow steps={args.steps}, "
          f"frame rate {frame_rate:g} Hz")
    print(f"\n## mixed-length job: {args.requests} requests, budgets {lo}..{hi} patches ({useful} useful frames), "
          f"{args.slots} rows")
    print("| batching | wall s | compile s | useful latent frames/s | x static (file order) | loop steps | prefills |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        m = mixed[n]
        print(f"| {n} | {m['seconds']:.2f} | {m['compile_s']:.1f} | {m['frames_per_s']:.0f} "
              f"| {m['frames_per_s'] / static_fps:.2f} | {m['loop_steps']} | {m['prefills']} |")
    print(f"continuous / static (file order) = {cont_fps / static_fps:.2f}x (target >= 1.5); "
          f"continuous / static sorted by budget = {cont_fps / sorted_fps:.2f}x")
    print("\n## batch-1 step and equal-length throughput")
    print(f"TTS step b1: {step_s * 1000:.1f} ms" + (f"; reference {ref_step:.1f} ms -> project / reference = "
                                                    f"{step_s * 1000 / ref_step:.2f} (target <= 0.5)" if ref_step else ""))
    print("\nwhere the step's time goes (ms, each piece jitted alone on the same state; reference: tts_step_b1)")
    print("| piece | batch 1 | reference batch 1 | reference / ours |" + (" batch 8 |" if 8 in parts else ""))
    print("|---|---|---|---|" + ("---|" if 8 in parts else ""))
    for name, label in (("whole_step", "whole step"), ("flow_sample", "flow sample (+ stop head)"),
                        ("unified_emb", "semantic module + pooling"), ("llm", "LLM, one position")):
        ref = reference.value("tts_step_b1", name) if small else None
        if name == "unified_emb" and ref is not None:
            ref += reference.value("tts_step_b1", "linear_pooling") or 0.0
        ours = parts[1][name]
        b8 = f" {parts[8][name]:.1f} |" if 8 in parts else ""
        print(f"| {label} | {ours:.1f} | {'' if ref is None else f'{ref:.1f}'} | "
              f"{'' if ref is None else f'{ref / ours:.2f}'} |{b8}")
    print()
    print("| mode | batch | wall s | compile s | latent frames/s | RTF | x reference b1 loop | x one device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = "" if r["vs_one_device"] is None else f"{r['vs_one_device']:.2f}"
        vs = f"{r['frames_per_s'] / ref_fps:.2f}" if ref_fps else ""
        print(f"| {r['mode']} | {r['batch']} | {r['seconds']:.3f} | {r['compile_s']:.1f} | {r['frames_per_s']:.0f} "
              f"| {r['rtf']:.4f} | {vs} | {one} |")
    if ref_fps:
        b8 = next((r for r in rows if r["mode"] == "compiled loop" and r["batch"] == 8), None)
        if b8:
            print(f"batch-8 TTS / reference batch-1 loop ({ref_fps:.1f} latent frames/s) = "
                  f"{b8['frames_per_s'] / ref_fps:.2f}x (target >= 10)")
        print(reference.describe())
    print(f"\nstreaming (batch 1, chunk {args.chunk} patches = {args.chunk * p / frame_rate * 1000:.0f} ms of audio): "
          f"first-chunk latency {lat * 1000:.1f} ms (after warm-up)")
    if args.json:
        out = {"config": config, "device": f"{dev.platform} {dev.device_kind}", "host": platform.node(),
               "flow_steps": args.steps, "mesh": args.mesh, "mixed": mixed, "mixed_requests": args.requests,
               "mixed_budgets": [lo, hi], "slots": args.slots, "rounds": args.rounds,
               "mixed_static_frames_per_s": static_fps, "mixed_sorted_frames_per_s": sorted_fps,
               "mixed_continuous_frames_per_s": cont_fps, "step_b1_ms": step_s * 1000,
               "reference_step_b1_ms": ref_step, "reference_b1_frames_per_s": ref_fps, "rows": rows,
               "stream_first_chunk_ms": lat * 1000, "stream_chunk_patches": args.chunk,
               "step_parts_ms": {str(b): v for b, v in parts.items()}, "cpu": reference.cpu_model(),
               "same_cpu_as_reference": reference.same_cpu()}
        write_json(args.json, out, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
