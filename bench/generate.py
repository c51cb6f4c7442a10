"""TTS generation benchmark: the compiled batched loop (:func:`unitok_jax.generate.tts`, one ``lax.while_loop``) at
batch 1, 8 and 32 versus a step-by-step Python loop of the same jitted step at batch 1 (the way the reference
drives its model: one dispatch and one host sync per patch), plus streaming first-chunk latency.

Random weights; the stop head never fires (threshold > 1), so every row generates exactly ``--patches`` patches.
Timings are steady state (median of repeats, everything on the host at the end: latents and waveforms); compile
time (first call minus steady time) is reported separately. Latent frames/s counts generated frames over all rows;
RTF = wall time / seconds of audio generated (over all rows).

Configs: ``tiny`` (:data:`unitok_jax.generate.TINY_BAILINGMM` at the real 320-sample hop, 50 Hz) and ``small``
(``../shared/perf/small/config.json``: LLM 512 x 6, 16 experts; VAE/semantic 256 x 4). The official 16B-parameter
LLM is not built from random weights here.

``--mesh data=2,fsdp=2,expert=2`` (or a preset) also runs the compiled loop SPMD on that mesh (params sharded by
:func:`unitok_jax.sharding.uniaudio_shardings`, the batch over data x fsdp, the MoE expert-parallel) and prints its
throughput against one device in the same run. On a CPU the script simulates the mesh's devices
(``--xla_force_host_platform_device_count``): they share the same cores, so the ratio shows what the partitioning
and its communication cost, not a speed-up.

Usage: ``python bench/generate.py [--config tiny|small] [--mesh SPEC] [--quick] [--json PATH]``; ``--quick``
(< 2 min on 2 CPU cores) uses fewer patches and repeats.
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

from unitok_jax import generate as G  # noqa: E402
from unitok_jax import model  # noqa: E402

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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=("tiny", "small"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--patches", type=int, default=None, help="patches per request (default 64, quick 16)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--chunk", type=int, default=4, help="streaming chunk, patches")
    ap.add_argument("--steps", type=int, default=10, help="flow sampler steps")
    ap.add_argument("--mesh", default=None, help="also run on this mesh (axis=size,... or a preset)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    patches = args.patches or (16 if args.quick else 64)
    repeats = 2 if args.quick else 5
    cfg = build_config(args.config)
    params = model.init_params(cfg, jax.random.key(0))
    sampler = G.Sampler(steps=args.steps)
    frame_rate = cfg.vae.sample_rate / cfg.vae.hop
    kw = dict(sampler=sampler, stop_threshold=2.0, min_steps=0)
    key = jax.random.key(1)
    rows = []

    def record(mode, batch, sec, compile_s, note=""):
        frames = batch * patches * cfg.patch_size
        rows.append({"mode": mode, "batch": batch, "patches": patches, "seconds": sec, "compile_s": compile_s,
                     "frames_per_s": frames / sec, "rtf": sec / (frames / frame_rate), "note": note})

    for b in [int(x) for x in args.batches.split(",")]:
        req = make_requests(cfg, b, 24, 8, patches)
        sec, comp = timed(lambda: G.tts(params, cfg, *req, key, **kw), repeats)
        record("compiled loop", b, sec, comp)
    req1 = make_requests(cfg, 1, 24, 8, patches)
    sec, comp = timed(lambda: G.tts(params, cfg, *req1, key, mode="python", **kw), repeats)
    record("python loop of jitted steps", 1, sec, comp)
    python_b1 = rows[-1]["frames_per_s"]
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
        r["speedup_vs_python_b1"] = r["frames_per_s"] / python_b1
        one = next((x for x in rows if x["mode"] == "compiled loop" and x["batch"] == r["batch"]), None)
        r["vs_one_device"] = r["frames_per_s"] / one["frames_per_s"] if one else None

    def first_chunk():
        t0 = time.perf_counter()
        gen = G.tts_stream(params, cfg, *req1, key, chunk_patches=args.chunk, **kw)
        next(gen)
        dt = time.perf_counter() - t0
        for _ in gen:
            pass
        return dt

    first_chunk()  # compile (init, run, per-length stream decode)
    lat = statistics.median(first_chunk() for _ in range(repeats))

    dev = jax.devices()[0]
    print(f"# TTS generation, config={args.config}, device={dev.platform} ({dev.device_kind}), "
          f"{patches} patches/request, flow steps={args.steps}, frame rate {frame_rate:g} Hz")
    print("| mode | batch | wall s | compile s | latent frames/s | RTF | x python b1 | x one device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        one = "" if r["vs_one_device"] is None else f"{r['vs_one_device']:.2f}"
        print(f"| {r['mode']} | {r['batch']} | {r['seconds']:.3f} | {r['compile_s']:.1f} | {r['frames_per_s']:.0f} "
              f"| {r['rtf']:.4f} | {r['speedup_vs_python_b1']:.2f} | {one} |")
    print(f"\nstreaming (batch 1, chunk {args.chunk} patches = {args.chunk * cfg.patch_size / frame_rate * 1000:.0f} ms"
          f" of audio): first-chunk latency {lat * 1000:.1f} ms")
    if args.json:
        out = {"config": args.config, "device": f"{dev.platform} {dev.device_kind}", "host": platform.node(),
               "patches": patches, "flow_steps": args.steps, "mesh": args.mesh, "rows": rows,
               "stream_first_chunk_ms": lat * 1000, "stream_chunk_patches": args.chunk}
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
