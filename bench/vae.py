#!/usr/bin/env python
"""AudioVAE speed: encode / decode throughput (seconds of audio per second of wall time) and compile time.

Sizes: the reference fixture model, the "small" configuration whose reference (PyTorch) timings are in
shared/perf/small, and an estimate of the official MingTok-Audio size (random weights). Batch 1 and 8.
Ratios: ours vs the reference at the small size (same input: 10 s of the same recording), the reference figures read
from its raw runs through ``bench/reference.py`` (mean of the runs' medians; encode, decode, encode->decode at batch
1 and 8, streaming decode of one 5-frame patch), and, inside this run, offline decode vs streaming decode in
5-frame patches. How close to the limit: achieved GFLOP/s (matmul FLOPs of the traced program, loop bodies times
their trip counts, see ``bench/peak.py``) next to a float32 matmul peak measured in the same run.

  python bench/vae.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
import peak  # noqa: E402
import reference  # noqa: E402
from unitok_jax import vae  # noqa: E402
from unitok_jax.audio import load_audio  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared")
REFERENCE_SECONDS = 10.0  # the reference timed the first 10 s of the same recording
# our quantity -> the reference's key path (reference.value); "{b}" is the batch size
REFERENCE_KEYS = {
    "encode": ("vae_10s", "b{b}", "encode_latent"),
    "decode": ("vae_10s", "b{b}", "decode"),
    "encode_decode": ("vae_10s", "b{b}", "encode_then_decode"),
    # streaming decode of one 5-frame patch inside the reference's TTS loop (steps 1-49, batch 1)
    "stream_patch": ("tts_loop_50_b1_with_stream_decode", "per_step_parts_steps_1_49", "stream_decode"),
}
QUANTITY_NAMES = {"encode": "encode", "decode": "decode", "encode_decode": "encode->decode",
                  "stream_patch": "stream decode / patch"}


def reference_ms(quantity: str, batch: int) -> float | None:
    """The reference's time (ms, mean of its runs' medians) for ``quantity`` at ``batch``, None when absent (no
    shared folder, or a key the runs lack: streaming decode is timed at batch 1 only)."""
    keys = REFERENCE_KEYS[quantity]
    if quantity == "stream_patch" and batch != 1:
        return None
    return reference.value(*(k.format(b=batch) for k in keys))

# The released backbone sizes are not known from the code (spec 6.1: read from the checkpoint's config.json).
# This estimate matches the reported 1.35B tokenizer parameters: Whisper-large-v3 semantic module (1280 x 32)
# plus two 1024-wide, 20-layer Qwen2 backbones with the 32-frame window of the technical report.
OFFICIAL_ESTIMATE = {
    "enc_kwargs": {"input_dim": 320, "hop_size": 320, "latent_dim": 64, "backbone": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 20, "num_attention_heads": 16,
        "num_key_value_heads": 16, "use_sliding_window": True, "sliding_window": 32}},
    "dec_kwargs": {"output_dim": 320, "latent_dim": 64, "backbone": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 20, "num_attention_heads": 16,
        "num_key_value_heads": 16, "use_sliding_window": True, "sliding_window": 32}},
    "semantic_module_kwargs": {"whisper_encoder": {"n_state": 1280, "n_head": 20, "n_layer": 32}},
}


def sizes():
    fixture = json.load(open(os.path.join(SHARED, "fixtures/reference/audio_vae.config.json")))["kwargs"]
    small = json.load(open(os.path.join(SHARED, "perf/small/config.json")))["audio_tokenizer_config"]
    return {"fixture": fixture, "small": small, "official-estimate": OFFICIAL_ESTIMATE}


def compile_timed(lowered):
    """(compiled program, seconds to compile it)."""
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def timeit(fn, repeats, warm_up=True):
    """(first call seconds, list of steady-state seconds). ``warm_up=False`` when every program ``fn`` runs has
    already run once (the first call would then be one more repeat, and it costs seconds at the largest size)."""
    t0 = time.perf_counter()
    if warm_up:
        jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, shorter audio for the largest size")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sizes", default="fixture,small,official-estimate")
    ap.add_argument("--seconds", type=float, default=REFERENCE_SECONDS, help="audio per batch item")
    args = ap.parse_args()

    # measured first, in this process: the same machine load and XLA build as the timings below
    peak_gflops = peak.matmul_peak_gflops(quick=args.quick)
    speech = load_audio(os.path.join(SHARED, "data/librispeech-1089-134686-0000.flac"))
    rows, versus = [], []
    start = time.perf_counter()
    for name in args.sizes.split(","):
        kwargs = sizes()[name]
        cfg = vae.VAEConfig.from_reference(kwargs)
        params = jax.block_until_ready(vae.init_params(cfg, jax.random.key(0)))  # init is async: finish it first
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        big = name == "official-estimate"
        seconds = min(args.seconds, 1.0) if (big and args.quick) else args.seconds
        batches = (1,) if (big and args.quick) else (1, 8)
        repeats = (1 if args.quick else 3) if big else (3 if args.quick else 10)
        n = int(seconds * cfg.sample_rate)
        for b in batches:
            wave = jax.block_until_ready(jnp.asarray(np.tile(speech[:n], (b, 1))))
            key = jax.random.key(2)
            # compiled explicitly so compile time is its own figure and XLA's cost analysis reads the timed program
            enc, c_enc = compile_timed(vae.encode.lower(params, cfg, wave, key=key))
            latent = jax.block_until_ready(enc(params, wave, key=key).latent)  # also the encoder's warm-up
            dec, c_dec = compile_timed(vae.decode.lower(params, cfg, latent))
            _, t_enc = timeit(lambda: enc(params, wave, key=key).latent, repeats, warm_up=False)
            _, t_dec = timeit(lambda: dec(params, latent), repeats)
            # two dispatches, as the reference (decode(encode_latent(wave))) and shared/perf/refbench time it
            _, t_ed = timeit(lambda: dec(params, enc(params, wave, key=key).latent), repeats, warm_up=False)
            # matmul FLOPs with the layer scans counted per layer (XLA's cost analysis counts a scan body once)
            flops = {"encode": peak.traced_flops(lambda p, w, k: vae.encode(p, cfg, w, key=k).latent,
                                                 params, wave, key),
                     "decode": peak.traced_flops(lambda p, z: vae.decode(p, cfg, z), params, latent)}
            flops["encode_decode"] = (None if None in flops.values() else flops["encode"] + flops["decode"])
            audio = b * seconds
            row = {"size": name, "params_M": n_params / 1e6, "batch": b, "audio_s": audio,
                   "encode_ms": 1e3 * statistics.median(t_enc), "decode_ms": 1e3 * statistics.median(t_dec),
                   "encode_decode_ms": 1e3 * statistics.median(t_ed),
                   "encode_compile_s": c_enc, "decode_compile_s": c_dec,
                   "encode_xla_flops": peak.xla_flops(enc), "decode_xla_flops": peak.xla_flops(dec)}
            row["encode_x_realtime"] = audio / (row["encode_ms"] / 1e3)
            row["decode_x_realtime"] = audio / (row["decode_ms"] / 1e3)
            for q in ("encode", "decode", "encode_decode"):
                a = peak.achieved(flops[q], row[f"{q}_ms"] / 1e3, peak_gflops)
                row[f"{q}_flops"] = flops[q]
                row[f"{q}_gflop_s"], row[f"{q}_pct_of_peak"] = a["gflop_s"], a["pct_of_peak"]
            if b == 1:  # streaming decode in 5-frame patches, same latents
                t = latent.shape[1] - latent.shape[1] % 5
                state0 = vae.init_stream_state(cfg, 1, t, 5)

                def stream():
                    st, outs = state0, []
                    for s in range(0, t, 5):
                        y, st = vae.decode_stream(params, cfg, latent[:, s : s + 5], st, last=s + 5 == t)
                        outs.append(y)
                    return outs[-1]

                _, t_st = timeit(stream, max(1, repeats // 2))
                row["stream_patch_ms"] = 1e3 * statistics.median(t_st) / (t // 5)
                row["offline_vs_stream_speed"] = statistics.median(t_st) / statistics.median(t_dec)
            if name == "small":
                # the reference timed 10 s of audio: other lengths have no reference figure
                for q in ("encode", "decode", "encode_decode", "stream_patch"):
                    if f"{q}_ms" not in row:
                        continue
                    ref = reference_ms(q, b) if seconds == REFERENCE_SECONDS else None
                    row[f"{q}_speedup_vs_ref"] = None if ref is None else ref / row[f"{q}_ms"]
                    # no FLOP count for the streaming patch (a Python loop of calls): "n/a"
                    fl = row.get(f"{q}_flops")
                    versus.append({"batch": b, "quantity": q, "ours_ms": row[f"{q}_ms"], "reference_ms": ref,
                                   "speedup": row[f"{q}_speedup_vs_ref"], "gflops": None if fl is None else fl / 1e9,
                                   "gflop_s": row.get(f"{q}_gflop_s"), "pct_of_peak": row.get(f"{q}_pct_of_peak")})
            rows.append(row)
            print(f"  done {name} b={b} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    cols = [("size", "{:>17}"), ("params_M", "{:>8.1f}"), ("batch", "{:>5}"), ("audio_s", "{:>7.1f}"),
            ("encode_ms", "{:>10.1f}"), ("encode_x_realtime", "{:>8.0f}"), ("encode_compile_s", "{:>8.2f}"),
            ("decode_ms", "{:>10.1f}"), ("decode_x_realtime", "{:>8.0f}"), ("decode_compile_s", "{:>8.2f}"),
            ("encode_decode_ms", "{:>10.1f}"), ("encode_decode_gflop_s", "{:>7.1f}"),
            ("encode_decode_pct_of_peak", "{:>5.1f}"),
            ("stream_patch_ms", "{:>9.2f}"), ("offline_vs_stream_speed", "{:>8.1f}")]
    heads = ["size", "Mparams", "batch", "audio s", "enc ms", "enc xRT", "enc cmp", "dec ms", "dec xRT",
             "dec cmp", "e->d ms", "e->d GFLOP/s", "% of peak", "strm/pt", "off/strm"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---" for _ in heads) + "|")
    for r in rows:
        cells = [("n/a" if r[k] is None else fmt.format(r[k]).strip()) if k in r else "" for k, fmt in cols]
        print("| " + " | ".join(cells) + " |")
    print("\nxRT = seconds of audio per second of wall time; cmp = compile seconds (lower + compile);"
          "\ne->d = encode then decode (two calls, as the reference times it); GFLOP/s = matmul FLOPs of the traced "
          "program (layer scans times their depth) / median time;\nstrm/pt = streaming decode ms per 5-frame patch; "
          "off/strm = streaming time / offline time (same latents).")
    if versus:
        print("\nsmall configuration vs the reference (10 s of audio; ref/ours > 1: we are faster) and vs the "
              "same-run peak")
        vheads = ["batch", "quantity", "ours ms", "reference ms", "ref/ours", "GFLOP", "GFLOP/s", "% of peak"]
        print("| " + " | ".join(vheads) + " |")
        print("|" + "|".join("---" for _ in vheads) + "|")
        for v in versus:
            print(f"| {v['batch']} | {QUANTITY_NAMES[v['quantity']]} | {v['ours_ms']:.1f} | "
                  f"{peak.fmt(v['reference_ms'])} | {peak.fmt(v['speedup'], '.2f')} | {peak.fmt(v['gflops'], '.2f')} | "
                  f"{peak.fmt(v['gflop_s'])} | {peak.fmt(v['pct_of_peak'])} |")
    print("\n" + peak.describe_peak(peak_gflops, args.quick))
    print(reference.describe())
    if args.json:
        write_json(args.json, {"device": str(jax.devices()[0]), "quick": args.quick,
                               **peak.run_info(args.quick, peak_gflops), "rows": rows, "vs_reference": versus},
                   indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
