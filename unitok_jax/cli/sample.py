"""Batch sampling from a unitok_jax checkpoint (``unitok-sample``, ``python -m unitok_jax.cli.sample``, or
``python sample.py`` in a checkout).

  python sample.py tts  --checkpoint DIR --input requests.jsonl --out OUTDIR [--batch-size N --cfg --steps --seed]
  python sample.py asr  --checkpoint DIR --input requests.jsonl --out OUTDIR
  python sample.py edit --checkpoint DIR --input requests.jsonl --out OUTDIR
  python sample.py reconstruct --checkpoint DIR IN.wav [IN2.flac ...] --out OUTDIR   (or --input requests.jsonl)

Request lines (JSON objects): tts ``{"id", "text", "prompt_wav"?, "prompt_text"?}``; asr ``{"id", "wav",
"context"?}``; edit ``{"id", "wav", "instruction", "semantic"?}``. Outputs: ``OUTDIR/<id>.wav`` (tts, edit) and
``OUTDIR/results.jsonl`` (every task), both written atomically. A bad request (broken line, missing field, missing
or unreadable audio, empty text, audio shorter than one patch, a request longer than the model's positions) is
reported with its line number and skipped; the rest complete. ``results.jsonl`` is rewritten after every finished
request, so a killed run loses at most the requests in flight: re-running skips requests whose outputs exist
(``--overwrite`` redoes them) and removes the temporary files a kill left behind. Generated audio with NaN/inf
samples (a numerical fault) is written with them replaced and reported (``nonfinite_samples`` in its row).
``reconstruct`` encodes and decodes audio files with the AudioVAE (re-runs likewise keep finished outputs). Exit
status: 0 if every request succeeded, 1 if some failed, 2 for a usage or checkpoint error.

Batching (tts / asr / edit): requests are sorted by expected cost (prompt audio and patch budget, or input
duration) and run ``--batch-size`` at a time. With ``--slots S`` each group of ``--batch-size`` requests (default
16 S) runs with continuous batching on S rows: the compiled loop returns to the host every ``--rounds`` steps at
most, finished rows are written out of the group's results and refilled with the next requests, so no row runs
idle while a long request finishes (the outputs are the same as without ``--slots``).

At scale (tts / asr / edit): ``--mesh data=2,fsdp=2,expert=2`` (or a preset of ``unitok_jax.sharding.MESH_PRESETS``)
loads every parameter straight into its sharding over this process's devices and runs the compiled loops SPMD on
that mesh; ``--dtype bfloat16`` casts the compute parameters on load. Several processes (``jax.distributed``, started
as for train.py: ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, SLURM, Open MPI or a TPU
slice; ``--distributed``) split the request list deterministically (request k of the file goes to process
k mod P), each on its own devices with its own copy of the model (sampling needs no traffic between hosts); each
writes its WAVs and its rows to ``results.part-<rank>.jsonl``, and process 0 merges the parts into the one
``results.jsonl`` at the end. A killed multi-process job resumes like a single-process one (any process count).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings

import numpy as np


@dataclasses.dataclass
class Item:
    path: str
    out: str
    wave: np.ndarray | None = None
    seconds: float = 0.0
    error: str | None = None
    kept: bool = False  # the output exists from an earlier run (not redone)
    note: str = ""


def _remove_stale_temps(folder: str) -> None:
    """Temporary files a killed earlier run left in the output folder (outputs are written under a temporary name
    and renamed into place, so these are never finished outputs). One sample.py per output folder at a time."""
    import re

    pattern = re.compile(r"^\.(.+\.[0-9a-f]{32}\.tmp|results\..+)$")  # unitok_jax.io's names; .results.*: older runs
    for name in os.listdir(folder):
        if pattern.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _output_names(paths: list[str], out_dir: str) -> list[str]:
    """OUTDIR/<stem>.wav, disambiguating equal stems (a.wav and a.flac) with a numeric suffix."""
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "audio"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(os.path.join(out_dir, f"{stem}.wav" if n == 0 else f"{stem}-{n}.wav"))
    return names


def reconstruct(args) -> int:
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from unitok_jax import vae
    from unitok_jax.shapes import pad_waves
    from unitok_jax.audio import AudioError, load_audio, save_audio
    from unitok_jax.convert import ConversionError, load

    try:
        cfg, params = load(args.checkpoint).vae()  # a tokenizer-only or a full checkpoint
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = jax.device_put(params)
    hop, sr = cfg.hop, cfg.sample_rate
    os.makedirs(args.out, exist_ok=True)
    _remove_stale_temps(args.out)

    if args.input:  # JSONL requests {"id", "wav"}: outputs <id>.wav, bad lines reported and skipped
        try:
            reqs, bad = read_requests(args.input, "reconstruct")
        except OSError as e:
            print(f"error: cannot read {args.input}: {e}", file=sys.stderr)
            return 2
        items = [Item(r.fields["wav"], os.path.join(args.out, f"{r.id}.wav")) for r in reqs]
        items += [Item(b.split(": ", 1)[0], "", error=b) for b in bad]
    else:
        items = [Item(p, o) for p, o in zip(args.inputs, _output_names(args.inputs, args.out))]
    for it in items:  # finished by an earlier (maybe killed) run: kept, not redone
        it.kept = it.error is None and not args.overwrite and os.path.isfile(it.out)
    for it in tqdm([it for it in items if not it.kept], desc="load", unit="file", disable=args.quiet):
        try:
            it.wave = load_audio(it.path, sr, max_seconds=args.max_seconds)
            it.seconds = len(it.wave) / sr
        except AudioError as e:
            it.error = str(e)

    key = jax.random.key(args.seed)
    chunk_frames = int(args.chunk_seconds * sr) // hop
    ok = sorted((it for it in items if it.error is None and not it.kept), key=lambda it: len(it.wave))
    short = [it for it in ok if len(it.wave) <= chunk_frames * hop]
    long = [it for it in ok if len(it.wave) > chunk_frames * hop]
    base = max(1, int(args.bucket_seconds * sr) // hop)
    batches = [short[i : i + args.batch_size] for i in range(0, len(short), args.batch_size)]
    t0 = time.perf_counter()
    bar = tqdm(total=sum(it.seconds for it in ok), desc="reconstruct", unit="s audio", disable=args.quiet,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}]")

    def write(it: Item, wave: np.ndarray) -> None:
        wave = wave[: len(it.wave)]
        bad = int(wave.size - np.count_nonzero(np.isfinite(wave)))
        if bad:  # a numerical fault: never write NaN audio
            wave = np.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0)
            it.note = f" ({bad} non-finite samples replaced: NaN -> 0, +-inf -> +-1)"
        try:
            save_audio(it.out, wave, sr, subtype=args.subtype)
        except (AudioError, OSError) as e:
            it.error = f"{it.out}: cannot write: {e}"
        bar.update(it.seconds)

    for batch in batches:
        # buckets base * 2^k frames (at most 2x padding), a fixed batch size: one program per bucket
        wave, lengths = pad_waves([it.wave for it in batch], hop, sizes=(base,), rows=args.batch_size)
        key, sub = jax.random.split(key)
        enc = vae.encode(params, cfg, jnp.asarray(wave), jnp.asarray(lengths), key=sub, sample=args.sample)
        out = np.asarray(vae.decode(params, cfg, enc.latent, enc.frame_num))
        for i, it in enumerate(batch):
            write(it, out[i])
    for it in long:  # one at a time, chunk by chunk with the KV caches (same result, bounded memory)
        key, sub = jax.random.split(key)
        enc = vae.encode_chunked(params, cfg, it.wave[None], chunk_frames=chunk_frames, key=sub,
                                 sample=args.sample)
        write(it, np.asarray(vae.decode_chunked(params, cfg, enc.latent, chunk_frames=chunk_frames))[0])
    bar.close()
    wall = time.perf_counter() - t0

    width = max([len(it.path) for it in items] + [4])
    print(f"\n{'file':<{width}}  {'seconds':>8}  result")
    for it in items:
        result = (f"{it.out} (exists, kept; --overwrite redoes it)" if it.kept else it.out + it.note) \
            if it.error is None else f"FAILED: {it.error}"
        print(f"{it.path:<{width}}  {it.seconds:8.2f}  {result}")
    done = [it for it in items if it.error is None and not it.kept]
    kept = sum(it.kept for it in items)
    total = sum(it.seconds for it in done)
    print(f"\n{len(done)}/{len(items)} files" + (f" ({kept} kept from an earlier run)" if kept else "")
          + f", {total:.1f} s of audio in {wall:.1f} s"
          + (f" ({total / wall:.1f}x real time, compile included)" if wall > 0 and total else ""))
    return 0 if len(done) + kept == len(items) else 1


# ----------------------------------------------------------------------------------------------- JSONL tasks

TASK_FIELDS = {  # field -> (required, accepted types)
    "tts": {"id": (True, (str, int)), "text": (True, str), "prompt_wav": (False, str), "prompt_text": (False, str)},
    "asr": {"id": (True, (str, int)), "wav": (True, str), "context": (False, (list, str))},
    "edit": {"id": (True, (str, int)), "wav": (True, str), "instruction": (True, str), "semantic": (False, bool)},
    "reconstruct": {"id": (True, (str, int)), "wav": (True, str)},
}
_SAFE_ID = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@dataclasses.dataclass
class Request:
    line: int
    id: str
    fields: dict


def read_requests(path: str, task: str) -> tuple[list[Request], list[str]]:
    """Valid requests and one error message per bad line (``path:LINE: reason``)."""
    from unitok_jax.data.manifest import read_jsonl

    spec = TASK_FIELDS[task]
    required = {k: t for k, (req, t) in spec.items() if req}
    optional = {k: t for k, (req, t) in spec.items() if not req}
    good, errors = [], []
    for n, where, rec, problem in read_jsonl(path, required, optional, path_keys=("wav", "prompt_wav")):
        if problem is None and (not rec["id"] or not set(rec["id"]) <= _SAFE_ID or rec["id"].startswith(".")):
            problem = f"id {rec['id']!r} must use only letters, digits, '.', '_' and '-'"
        if problem is None and "text" in rec and not rec["text"].strip():
            problem = "empty text"
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        good.append(Request(n, rec["id"], rec))
    return good, errors


def _audio_seconds(path: str) -> float:
    """Duration from the file header (nothing decoded); 0 if unreadable (the load reports it later)."""
    import soundfile as sf

    try:
        return float(sf.info(path).duration)
    except Exception:  # noqa: BLE001 - any unreadable file sorts first and fails at its load, with its line number
        return 0.0


def by_expected_length(requests: list[Request], task: str, max_patches: int | None = None) -> list[Request]:
    """Requests ordered by what sets their program shapes and loop length, so a batch holds requests of similar
    cost (a row waits for the longest of its batch): TTS by prompt audio (none first), then the patch budget
    (:func:`unitok_jax.text.tts_patch_budget` of the text) and the text length; ASR / edit by the input audio's
    duration, then the instruction. Stable: equal keys keep the file order."""
    from unitok_jax.text import tts_patch_budget

    def key(r: Request):
        f = r.fields
        if task == "tts":
            prompt = _audio_seconds(f["prompt_wav"]) if "prompt_wav" in f else -1.0
            return (prompt, tts_patch_budget(f["text"], maximum=max_patches), len(f["text"]))
        return (_audio_seconds(f["wav"]), len(f.get("instruction", "")))

    return sorted(requests, key=key)


def _write_results(path: str, rows: dict) -> None:
    """Rewrite results.jsonl atomically (rows keyed by id, in id order)."""
    from unitok_jax.io import write_jsonl

    write_jsonl(path, (rows[rid] for rid in sorted(rows)))


def _result_parts(folder: str) -> list[str]:
    """The per-process result files (``results.part-<rank>.jsonl``) in ``folder``."""
    import re

    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if re.fullmatch(r"results\.part-\d+\.jsonl", n))


def _read_results(path: str, parts: bool = True) -> dict:
    """Rows of ``results.jsonl`` and (``parts``) of the per-process parts beside it (a killed multi-process run
    leaves them), keyed by id."""
    import json

    rows = {}
    folder = os.path.dirname(path) or "."
    for p in [path] + (_result_parts(folder) if parts and os.path.isdir(folder) else []):
        if not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8") as f:
            for raw in f:
                try:
                    obj = json.loads(raw)
                    rows[str(obj["id"])] = obj
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line is redone
    return rows


def _merge_results(path: str, ids: set[str] | None = None) -> None:
    """Fold the per-process parts into ``results.jsonl`` (atomically), then remove the parts. ``ids``: keep only
    rows of these ids (None: all)."""
    rows = _read_results(path)
    _write_results(path, {k: v for k, v in rows.items() if ids is None or k in ids})
    for p in _result_parts(os.path.dirname(path) or "."):
        os.unlink(p)


def _barrier(name: str) -> None:
    """All processes reach this point (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_task(args) -> int:
    import jax
    from tqdm import tqdm

    from unitok_jax.api import InputError, NonFiniteAudioWarning, UniAudio
    from unitok_jax.audio import AudioError, load_audio, save_audio
    from unitok_jax.convert import ConversionError
    from unitok_jax.generate import Sampler
    from unitok_jax.text import TextError
    from unitok_jax.training.sharded import maybe_initialize_distributed

    try:
        maybe_initialize_distributed(args.distributed)
    except (ValueError, RuntimeError) as e:
        print(f"error: --distributed {args.distributed}: {e}", file=sys.stderr)
        return 2
    rank, nproc = jax.process_index(), jax.process_count()
    try:
        requests, errors = read_requests(args.input, args.command)
    except OSError as e:
        print(f"error: cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    try:
        m = UniAudio.load(args.checkpoint, mesh=args.mesh, dtype=args.dtype)
    except (ConversionError, TextError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad --mesh / --dtype (or a mesh that does not match the devices)
        print(f"error: --mesh {args.mesh} / --dtype {args.dtype}: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        _remove_stale_temps(args.out)
        if args.overwrite:
            for part in _result_parts(args.out):
                os.unlink(part)
    _barrier("sample-start")  # no process writes before process 0 has cleaned up
    results_path = os.path.join(args.out, "results.jsonl")
    results = {} if args.overwrite else _read_results(results_path)
    wav_out = args.command in ("tts", "edit")
    mine = requests[rank::nproc]  # deterministic split: request k of the file -> process k mod P
    todo = [r for r in mine if args.overwrite or r.id not in results
            or (wav_out and not os.path.isfile(os.path.join(args.out, f"{r.id}.wav")))]
    skipped = len(mine) - len(todo)
    if nproc > 1:  # this process's rows go to its own part; process 0 merges them at the end
        errors = [e for k, e in enumerate(errors) if k % nproc == rank]
        results_file = os.path.join(args.out, f"results.part-{rank}.jsonl")
        results = {k: v for k, v in results.items() if k in {r.id for r in mine}}
    else:
        results_file = results_path
    sr = m.sample_rate
    sampler = Sampler(steps=args.steps, cfg=args.cfg, sigma=args.sigma, temperature=args.temperature, sway=args.sway)
    batching = {"slots": args.slots, "rounds": args.rounds}

    def load(r: Request, key: str):  # audio of one request, or an error message with its line number
        try:
            return load_audio(r.fields[key], sr, max_seconds=args.max_seconds)
        except AudioError as e:
            errors.append(f"{args.input}:{r.line}: {e}")
            return None

    t0, audio_s, done = time.perf_counter(), 0.0, 0
    notes: list[str] = []

    def call(fn, pairs):
        """fn(requests, waves) on a group; a request the API refuses (InputError) is reported and dropped, the rest
        retried; any other failure fails the whole group (reported, the run goes on). Returns (pairs run, outputs,
        {position: non-finite sample count})."""
        pairs = list(pairs)
        while pairs:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", NonFiniteAudioWarning)
                    outs = fn([r for r, _ in pairs], [w for _, w in pairs])
            except InputError as e:
                r = pairs.pop(e.index)[0]
                errors.append(f"{args.input}:{r.line}: {e.what}")
                continue
            except Exception as e:  # noqa: BLE001 - reported per request, the run goes on
                errors.extend(f"{args.input}:{r.line}: failed ({type(e).__name__}: {e})" for r, _ in pairs)
                return [], [], {}
            for w in caught:
                if not isinstance(w.message, NonFiniteAudioWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            return pairs, outs, {w.message.index: w.message.count for w in caught
                                 if isinstance(w.message, NonFiniteAudioWarning)}
        return [], [], {}

    def finish(r: Request, row: dict, wave=None, bad: int = 0) -> None:
        """Write one request's outputs (WAV atomically, then its results row): a killed run redoes only the
        requests whose results row is missing."""
        nonlocal done, audio_s
        if wave is not None:
            save_audio(os.path.join(args.out, f"{r.id}.wav"), wave, sr)
            row = {**row, "wav": f"{r.id}.wav", "seconds": len(wave) / sr}
            audio_s += len(wave) / sr if args.command == "tts" else 0.0
        if bad:
            row["nonfinite_samples"] = bad
            notes.append(f"{args.input}:{r.line}: {bad} non-finite sample(s) in the generated audio replaced "
                         f"(NaN -> 0, +-inf -> +-1)")
        results[r.id] = {"id": r.id, "line": r.line, **row}
        _write_results(results_file, results)
        done += 1

    todo = by_expected_length(todo, args.command, args.max_patches)  # batches of similar length, not file order
    bar = tqdm(total=len(todo), desc=args.command, unit="utt", disable=args.quiet)
    for i in range(0, len(todo), args.batch_size):
        batch = todo[i : i + args.batch_size]
        if args.command == "tts":
            prompts = [load(r, "prompt_wav") if "prompt_wav" in r.fields else None for r in batch]
            ok = [(r, w) for r, w in zip(batch, prompts) if not ("prompt_wav" in r.fields and w is None)]
            groups = [[x for x in ok if (x[1] is None) == flag] for flag in (True, False)]  # with / without prompt
            for group in groups:
                if not group:
                    continue
                rs, waves, bad = call(lambda rs, ws: m.tts(
                    [r.fields["text"] for r in rs], None if ws[0] is None else ws,
                    [r.fields.get("prompt_text", "") for r in rs], seed=args.seed, max_patches=args.max_patches,
                    sampler=sampler, request_ids=[r.line for r in rs], **batching), group)
                for k, ((r, _), w) in enumerate(zip(rs, waves)):
                    finish(r, {}, w, bad.get(k, 0))
        else:
            waves = [load(r, "wav") for r in batch]
            ok = [(r, w) for r, w in zip(batch, waves) if w is not None]
            audio_s += sum(len(w) for _, w in ok) / sr
            if args.command == "asr":
                def asr(rs, ws):
                    ctx = [r.fields.get("context") for r in rs]
                    ctx = [c.split(",") if isinstance(c, str) else c for c in ctx]
                    return m.asr(ws, ctx, seed=args.seed, max_new_tokens=args.max_new_tokens, with_language=True,
                                 request_ids=[r.line for r in rs], **batching)

                rs, outs, _ = call(asr, ok)
                for (r, _), (lang, txt) in zip(rs, outs):
                    finish(r, {"language": lang, "text": txt})
            elif ok:
                rs, outs, bad = call(lambda rs, ws: m.edit(
                    ws, [r.fields["instruction"] for r in rs], semantic=[bool(r.fields.get("semantic", False))
                                                                        for r in rs],
                    seed=args.seed, max_text_tokens=args.max_new_tokens, max_patches=args.max_patches or 256,
                    sampler=sampler, request_ids=[r.line for r in rs], **batching), ok)
                for k, ((r, _), o) in enumerate(zip(rs, outs)):
                    finish(r, {"text": o.text, "target_transcript": o.target_transcript, "target_markup": o.markup},
                           o.wave, bad.get(k, 0))
        wall = time.perf_counter() - t0
        bar.set_postfix_str(f"{done / wall:.2f} utt/s, RTF {wall / audio_s:.3f}" if audio_s else "")
        bar.update(len(batch))
    bar.close()
    wall = time.perf_counter() - t0
    for e in notes:
        print(f"warning: {e}", file=sys.stderr)
    for e in errors:
        print(f"skipped {e}", file=sys.stderr)
    if nproc > 1:
        _barrier("sample-done")  # every part is complete
        if rank == 0:
            _merge_results(results_path)
        _barrier("sample-merged")
    who = f"process {rank}/{nproc}: " if nproc > 1 else ""
    print(f"{who}{done} done, {skipped} already done, {len(errors)} failed; {audio_s:.1f} s of audio in {wall:.1f} s"
          f" -> {results_path}")
    return 0 if not errors else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for task, what in (("tts", "speech from text in a prompt voice"), ("asr", "transcribe speech"),
                       ("edit", "edit speech by instruction")):
        t = sub.add_parser(task, help=what)
        t.add_argument("--checkpoint", required=True, help="full unitok_jax checkpoint (python -m unitok_jax.convert)")
        t.add_argument("--input", required=True, help="requests, one JSON object per line")
        t.add_argument("--out", required=True, help="output folder")
        t.add_argument("--batch-size", type=int, default=None,
                       help="requests per group (default 8; with --slots S: 16 S)")
        t.add_argument("--slots", type=int, default=None,
                       help="continuous batching on this many rows: finished rows are refilled with the next requests")
        t.add_argument("--rounds", type=int, default=16,
                       help="with --slots: loop steps at most between two refills (the host collects finished rows)")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--steps", type=int, default=10, help="flow sampler steps")
        t.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance strength")
        t.add_argument("--sigma", type=float, default=0.25, help="sampler SDE noise scale")
        t.add_argument("--temperature", type=float, default=1.5, help="sampler SDE temperature")
        t.add_argument("--sway", type=float, default=-1.0, help="sway sampling coefficient")
        t.add_argument("--max-patches", type=int, default=None, help="cap on generated 0.1 s patches")
        t.add_argument("--max-new-tokens", type=int, default=128,
                       help="text budget (the ASR transcript, the edit's <cot_text>)")
        t.add_argument("--max-seconds", type=float, default=None, help="reject input audio longer than this")
        t.add_argument("--overwrite", action="store_true", help="redo requests whose outputs exist")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
        t.add_argument("--mesh", default=None,
                       help="device mesh over this process's devices: axis sizes (data=2,fsdp=2,expert=2; one may be "
                            "-1) or a preset (1xH100, 8xH100, v5e-8, v5p-8, ...); default: one device")
        t.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                       help="cast the compute parameters on load (norms and the MoE router stay float32); default: "
                            "the checkpoint's dtype")
        t.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                       help="jax.distributed across processes, as train.py: auto = when JAX_COORDINATOR_ADDRESS/"
                            "JAX_NUM_PROCESSES/JAX_PROCESS_ID, SLURM, Open MPI or a TPU slice describe several")
    rec = sub.add_parser("reconstruct", help="encode and decode audio files with the AudioVAE")
    rec.add_argument("--checkpoint", required=True, help="unitok_jax checkpoint folder (python -m unitok_jax.convert)")
    rec.add_argument("inputs", nargs="*", help="audio files (any format/rate soundfile or librosa can read)")
    rec.add_argument("--input", help='instead of files: a JSONL of {"id", "wav"} requests (outputs <id>.wav)')
    rec.add_argument("--out", required=True, help="output folder for <name>.wav")
    rec.add_argument("--batch-size", type=int, default=8)
    rec.add_argument("--sample", action="store_true",
                     help="decode a posterior sample instead of the posterior mean (the default)")
    rec.add_argument("--seed", type=int, default=0, help="PRNG seed for --sample")
    rec.add_argument("--subtype", choices=("PCM_16", "FLOAT"), default="PCM_16", help="output WAV sample format")
    rec.add_argument("--bucket-seconds", type=float, default=2.0,
                     help="smallest length bucket; inputs are padded to this times a power of two")
    rec.add_argument("--chunk-seconds", type=float, default=60.0,
                     help="longer files are processed alone, chunk by chunk with the KV caches")
    rec.add_argument("--max-seconds", type=float, default=None, help="reject inputs longer than this")
    rec.add_argument("--overwrite", action="store_true",
                     help="redo inputs whose output exists (by default a re-run keeps them: resume after a kill)")
    rec.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.command == "reconstruct" and bool(args.inputs) == bool(args.input):
        ap.error("reconstruct takes audio files or --input requests.jsonl (one of the two)")
    if args.command in TASK_FIELDS and args.command != "reconstruct":
        if args.slots is not None and args.slots < 1:
            ap.error("--slots must be >= 1")
        if args.rounds < 1:
            ap.error("--rounds must be >= 1")
        if args.batch_size is None:
            args.batch_size = 8 if args.slots is None else 16 * args.slots
        if args.batch_size < 1:
            ap.error("--batch-size must be >= 1")
        return run_task(args)
    if args.command == "reconstruct":
        if args.batch_size < 1:
            ap.error("--batch-size must be >= 1")
        return reconstruct(args)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
