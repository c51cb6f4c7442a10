#!/usr/bin/env python
"""AudioVAE speed: encode / decode throughput (seconds of audio per second of wall time) and compile time.

Sizes: the reference fixture model, the "small" configuration whose reference (PyTorch, this machine) timings are
in shared/perf/small, and an estimate of the official MingTok-Audio size (random weights). Batch 1 and 8.
Ratios in the table: ours vs the reference's measured time at the small size (same input, same machine kind), and,
inside this run, offline decode vs streaming decode in 5-frame patches.

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
from unitok_jax import vae  # noqa: E402
from unitok_jax.audio import load_audio  # noqa: E402

SHARED = os.path.join(os.path.dirname(REPO), "shared")
# Reference medians (ms) for 10 s of audio, shared/perf/small/REFERENCE_TIMINGS.md section 1 and 2b.
REFERENCE_SMALL_MS = {(1, "encode"): 54.4, (1, "decode"): 69.7, (8, "encode"): 386.3, (8, "decode"): 474.2,
                      (1, "stream_patch"): 8.9}

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


def timeit(fn, repeats):
    """(compile+first call seconds, list of steady-state seconds)."""
    t0 = time.perf_counter()
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
    ap.add_argument("--seconds", type=float, default=10.0, help="audio per batch item")
    args = ap.parse_args()

    speech = load_audio(os.path.join(SHARED, "data/librispeech-1089-134686-0000.flac"))
    rows = []
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
            # the first timed call of each entry point includes its compilation
            c_enc, t_enc = timeit(lambda: vae.encode(params, cfg, wave, key=key).latent, repeats)
            latent = jax.block_until_ready(vae.encode(params, cfg, wave, key=key).latent)
            c_dec, t_dec = timeit(lambda: vae.decode(params, cfg, latent), repeats)
            audio = b * seconds
            row = {"size": name, "params_M": n_params / 1e6, "batch": b, "audio_s": audio,
                   "encode_ms": 1e3 * statistics.median(t_enc), "decode_ms": 1e3 * statistics.median(t_dec),
                   "encode_compile_s": c_enc - statistics.median(t_enc),
                   "decode_compile_s": c_dec - statistics.median(t_dec)}
            row["encode_x_realtime"] = audio / (row["encode_ms"] / 1e3)
            row["decode_x_realtime"] = audio / (row["decode_ms"] / 1e3)
            if name == "small" and seconds == 10.0:
                row["encode_speedup_vs_ref"] = REFERENCE_SMALL_MS[(b, "encode")] / row["encode_ms"]
                row["decode_speedup_vs_ref"] = REFERENCE_SMALL_MS[(b, "decode")] / row["decode_ms"]
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
                    row["stream_patch_speedup_vs_ref"] = REFERENCE_SMALL_MS[(1, "stream_patch")] / row[
                        "stream_patch_ms"]
            rows.append(row)
            print(f"  done {name} b={b}", file=sys.stderr, flush=True)

    cols = [("size", "{:>17}"), ("params_M", "{:>8.1f}"), ("batch", "{:>5}"), ("audio_s", "{:>7.1f}"),
            ("encode_ms", "{:>10.1f}"), ("encode_x_realtime", "{:>8.0f}"), ("encode_compile_s", "{:>8.2f}"),
            ("decode_ms", "{:>10.1f}"), ("decode_x_realtime", "{:>8.0f}"), ("decode_compile_s", "{:>8.2f}"),
            ("stream_patch_ms", "{:>9.2f}"), ("offline_vs_stream_speed", "{:>8.1f}"),
            ("encode_speedup_vs_ref", "{:>8.2f}"), ("decode_speedup_vs_ref", "{:>8.2f}"),
            ("stream_patch_speedup_vs_ref", "{:>8.2f}")]
    heads = ["size", "Mparams", "batch", "audio s", "enc ms", "enc xRT", "enc cmp", "dec ms", "dec xRT",
             "dec cmp", "strm/pt", "off/strm", "enc/ref", "dec/ref", "strm/ref"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("---" for _ in heads) + "|")
    for r in rows:
        cells = [fmt.format(r[k]).strip() if k in r else "" for k, fmt in cols]
        print("| " + " | ".join(cells) + " |")
    print("\nxRT = seconds of audio per second of wall time; cmp = compile seconds (first call minus steady state);"
          "\nstrm/pt = streaming decode ms per 5-frame patch; off/strm = streaming time / offline time (same "
          "latents);\nX/ref = reference median time / ours at the same size and input (>1: we are faster).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(jax.devices()[0]), "quick": args.quick, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
