"""python -m unitok_jax.eval: score VAE reconstructions, TTS outputs, ASR transcripts and speech edits from files.

  python -m unitok_jax.eval vae --reference MANIFEST.jsonl --generated DIR|RESULTS.jsonl [--split S] [--plots DIR]
  python -m unitok_jax.eval tts --results RESULTS.jsonl|DIR --reference MANIFEST.jsonl [--requests REQUESTS.jsonl]
                                [--plots DIR]
  python -m unitok_jax.eval asr --results RESULTS.jsonl|DIR --manifest MANIFEST.jsonl [--requests REQUESTS.jsonl]
  python -m unitok_jax.eval edit --results RESULTS.jsonl|DIR --manifest EDIT_MANIFEST.jsonl
                                 [--requests REQUESTS.jsonl] [--no-normalize]
  every subcommand: [--json OUT.json] [--quiet]

Input files are JSONL (one object per line), joined on ``id``; relative paths are relative to the file's folder.

* Manifest (``--reference``, ``--manifest``): ``unitok_jax.data.manifest`` lines ``{"id", "audio", "text",
  "speaker"}``; a ``sample.py`` request file ``{"id", "wav", ...}`` also works (``wav`` instead of ``audio``).
  ``vae`` needs ``audio``/``wav``; ``tts`` needs ``audio``/``wav`` (the reference rendering of the same sentence
  in the prompt voice) and uses ``speaker`` (the voice label) and ``prompt_wav`` when present; ``asr`` needs
  ``text``. ``--split`` keeps the lines whose ``split`` field matches.
* Results (``--results``, or a folder holding ``results.jsonl``): what ``sample.py`` writes -- tts ``{"id",
  "wav", "seconds"}`` with ``wav`` relative to the results file (``<id>.wav``); asr ``{"id", "text"}``.
* ``--generated`` (vae): a ``results.jsonl`` with ``{"id", "wav"}``, or a folder of reconstructions: ``<id>.wav``
  (``sample.py reconstruct --input requests.jsonl``) or, failing that, ``<stem of the reference audio>.wav``
  (``sample.py reconstruct FILES``); a ``results.jsonl`` inside the folder is used first when it exists.
* ``--requests`` (tts, asr, edit): the ``sample.py`` request file. For tts it supplies ``prompt_wav`` (the voice
  prompt), enabling the copy-the-prompt baseline and the speaker proxy; for both, a requested id without a
  result counts as a failed item (edit too).
* Edit (``edit``): the manifest is an edit-corpus manifest (``python -m unitok_jax.data.build_edit_corpus``'s
  ``heldout.jsonl``): ``{"id", "audio"`` (source speech), ``"target_audio"`` (the eSpeak rendering of the intended
  result), ``"edit_type"`` (delete / insert / substitute / faster / slower / louder / quieter / voice / add_noise /
  denoise), ``"target_markup"`` (the intended ``<cot_text>`` with its ``<edit>…</edit>`` span; null for acoustic
  edits), ``"edit_kind"?}``, paths relative to the manifest. The results are what ``sample.py edit`` writes:
  ``{"id", "wav"`` (the edited speech, relative to the results file), ``"seconds"`` (0: the model produced no
  audio), ``"target_markup"`` (the raw ``<cot_text>`` content, null without one), ``"target_transcript"``,
  ``"text"}``; the ids are the manifest's (a request file ``{"id", "wav": <source audio>, "instruction",
  "semantic"}`` made from it). Results without ``target_markup`` (older files) are scored on the
  ``target_transcript`` against the markup with the special tokens removed (rows say ``"cot_markup": false``).
  Metrics: :func:`unitok_jax.eval.metrics.evaluate_edit` (CoT CER / WER per semantic edit, MCD-DTW against the
  target and of the source against it, for acoustic edits whether duration / RMS level / SNR estimate / speaker
  proxy moved the right way relative to the source and by how much).

Judge (``vae`` and ``tts``; ``--judge none`` turns it off): Whisper tiny.en, offline (:mod:`unitok_jax.eval.whisper`;
weights from the ``eval`` extra, never from the network), transcribes the generated speech (reconstructions / TTS
outputs) and the reference audio of every item with a reference text (vae: the reference line's ``text``; tts: the
request's or the reference line's ``text``). Rows get ``judge_wer`` / ``judge_cer`` / ``judge_transcript`` (generated)
and ``judge_ref_wer`` / ``judge_ref_cer`` / ``judge_ref_transcript`` (reference); the report gets ``"judge":
{"model", "items", "generated": {corpus wer, cer, words, chars}, "reference": {...}, "wer_ratio", "cer_ratio"}``:
the judge's rates on the generated speech next to its rates on the references (for eSpeak renderings of the same
sentences: the floor a perfect system would reach).

Which items are scored: vae -- every reference line; tts / asr / edit -- every result (and every request with
``--requests``). Speaker proxy voices: the prompts, labelled by the reference line's ``speaker`` (else by the
prompt's path); each generated utterance is compared with its own voice and with all the others.

Output: a table (per-item rows, then means) on stdout and, with ``--json``, a JSON report written atomically:
``{"task", "inputs", "count", "scored", "failed": [{"id", "error"}], "problems": [...], "mean": {...},
"rows": [...]}`` (asr adds ``"corpus"``; edit adds ``"corpus"`` (CoT rates), ``"no_audio"``, ``"normalized"`` and
``"by_type": {edit_type: {"count", "scored", "no_audio", "mean", "corpus"}}``, and prints a per-type table).
Metrics are defined in :mod:`unitok_jax.eval.metrics`.

Exit status: 0 every item scored; 1 some items failed (missing result, unreadable audio, bad line); 2 an input
file cannot be read, nothing to score, or a missing dependency (``pip install 'unitok-jax[eval]'``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from unitok_jax.eval import metrics as M
from unitok_jax.io import write_json as atomic_json

SR = M.SAMPLE_RATE


class InputError(Exception):
    """An input file that cannot be used at all (exit status 2)."""


# ---------------------------------------------------------------------------------------------------- inputs

_OPTIONAL = {"audio": str, "wav": str, "text": str, "speaker": (str, int), "prompt_wav": str, "prompt_text": str,
             "split": str, "duration": (int, float), "seconds": (int, float), "language": str}


def read_rows(path: str, what: str, need: tuple = (), split: str | None = None,
              extra_path_keys: tuple = ()) -> tuple[dict, list[str]]:
    """``{id: record}`` of a JSONL file and one message per bad line. ``need``: fields a line must have, where
    ``"audio"`` is satisfied by ``audio`` or ``wav`` (stored as ``record["audio"]``). ``extra_path_keys``: more
    fields holding paths (made absolute relative to the file, as ``audio`` / ``wav`` / ``prompt_wav``); they must be
    strings when present."""
    from unitok_jax.data.manifest import read_jsonl

    if os.path.isdir(path):
        path = os.path.join(path, "results.jsonl")
    if not os.path.isfile(path):
        raise InputError(f"{what} {path}: no such file")
    rows, problems = {}, []
    try:
        for _, where, rec, problem in read_jsonl(path, {"id": (str, int)},
                                                 {**_OPTIONAL, **{k: str for k in extra_path_keys}},
                                                 path_keys=("audio", "wav", "prompt_wav", *extra_path_keys)):
            if problem is None:
                if "audio" not in rec and "wav" in rec:
                    rec["audio"] = rec["wav"]
                missing = [("'audio' (or 'wav')" if k == "audio" else repr(k)) for k in need if k not in rec]
                if missing:
                    problem = "missing field " + ", ".join(missing)
            if problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            if split is not None and rec.get("split") != split:
                continue
            rows[rec["id"]] = rec
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text ({e.reason})") from e
    return rows, problems


class AudioCache:
    """Load each audio file once (16 kHz mono float32); errors are remembered and re-raised as ValueError."""

    def __init__(self):
        self.cache: dict[str, object] = {}

    def __call__(self, path: str):
        from unitok_jax.audio import AudioError, load_audio

        if path not in self.cache:
            try:
                self.cache[path] = load_audio(path, SR)
            except AudioError as e:
                self.cache[path] = ValueError(str(e))
        v = self.cache[path]
        if isinstance(v, ValueError):
            raise v
        return v


# ---------------------------------------------------------------------------------------------------- output


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # numpy scalars
        return _clean(v.item())
    return v


def write_json(path: str, report: dict) -> None:
    """Write ``report`` as JSON atomically (:mod:`unitok_jax.io`); NaN -> null."""
    atomic_json(path, _clean(report), ensure_ascii=False, allow_nan=False)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def print_table(report: dict, columns: list[tuple[str, str, str]], file=None) -> None:
    """Per-item rows, then the means (``columns``: (key, header, format spec))."""
    file = file or sys.stdout
    rows = report["rows"]
    width = max([len(r["id"]) for r in rows] + [4])
    cw = [max(len(h), 7) for _, h, _ in columns]
    head = f"{'id':<{width}}  " + "  ".join(f"{h:>{w}}" for (_, h, _), w in zip(columns, cw))
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        if "error" in r:
            print(f"{r['id']:<{width}}  FAILED: {r['error']}", file=file)
        else:
            print(f"{r['id']:<{width}}  " + "  ".join(f"{_fmt(r.get(k), s):>{w}}"
                                                   for (k, _, s), w in zip(columns, cw)), file=file)
    print("-" * len(head), file=file)
    mean = report["mean"]
    print(f"{'mean':<{width}}  " + "  ".join(f"{_fmt(mean.get(k), s if k in mean else ''):>{w}}"
                                             for (k, _, s), w in zip(columns, cw)), file=file)
    for name, vals in report.get("extra_lines", {}).items():
        print(f"{name}: {vals}", file=file)
    print(f"{report['scored']}/{report['count']} items scored", file=file)


def _finish(args, task: str, report: dict, problems: list[str], inputs: dict, columns, after=None) -> int:
    report = {"task": task, "inputs": {k: (os.path.abspath(v) if v else v) for k, v in inputs.items()},
              "count": report["count"], "scored": report["scored"],
              "failed": [{"id": r["id"], "error": r["error"]} for r in report["rows"] if "error" in r],
              "problems": problems, **{k: v for k, v in report.items() if k not in ("count", "scored")}}
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not args.quiet:
        table = dict(report)
        if task == "asr" and report.get("corpus"):
            c = report["corpus"]
            table["extra_lines"] = {"corpus": f"WER {_fmt(c['wer'], '.4f')}  CER {_fmt(c['cer'], '.4f')} "
                                              f"({c['words']} words, {c['chars']} characters)"}
        if judge_line(report):
            table.setdefault("extra_lines", {})["judge"] = judge_line(report)
        print_table(table, columns)
        if after is not None:
            after(report)
    if args.json:
        try:
            write_json(args.json, report)
        except OSError as e:
            print(f"error: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(f"wrote {args.json}")
    return 0 if not report["failed"] and not problems else 1


def _plot(plots: str | None, rid: str, gen, ref, title: str, problems: list[str]) -> None:
    if plots:
        try:
            M.plot_mel_comparison(gen, ref, os.path.join(plots, f"{rid}.png"), SR, title=title)
        except (OSError, ValueError) as e:
            problems.append(f"{rid}: cannot write the plot: {e}")


# ------------------------------------------------------------------------------------------------ subcommands

VAE_COLUMNS = [("pesq", "PESQ", ".3f"), ("stoi", "STOI", ".3f"), ("log_mel_l1", "logmelL1", ".3f"),
               ("si_sdr", "SI-SDR", ".2f"), ("reference_seconds", "seconds", ".2f")]
TTS_COLUMNS = [("mcd", "MCD", ".2f"), ("baseline_mcd", "MCDcopy", ".2f"), ("generated_seconds", "gen_s", ".2f"),
               ("reference_seconds", "ref_s", ".2f"), ("duration_rel_error", "dur_rel", ".3f"),
               ("speaker_similarity_prompt", "spk_sim", ".3f"), ("speaker_similarity_others", "spk_oth", ".3f"),
               ("speaker_top1", "spk_top1", ".2f")]
ASR_COLUMNS = [("wer", "WER", ".4f"), ("cer", "CER", ".4f"), ("word_errors", "w_err", "d"), ("words", "words", "d")]
EDIT_COLUMNS = [("edit_type", f"{'type':>10}", ""), ("wer", "cotWER", ".3f"), ("cer", "cotCER", ".3f"), ("mcd", "MCD", ".2f"),
                ("baseline_mcd", "MCDsrc", ".2f"), ("moved_right", "moved", ""), ("progress", "progress", ".2f"),
                ("speaker_similarity_target", "spk_tgt", ".3f"), ("edited_seconds", "gen_s", ".2f")]
EDIT_TYPE_COLUMNS = [("pairs", "pairs", "d"), ("scored", "scored", "d"), ("no_audio", "no_audio", "d"),
                     ("cot_wer", "cotWER", ".3f"), ("cot_cer", "cotCER", ".3f"), ("cot_exact", "cot_ok", ".2f"),
                     ("mcd", "MCD", ".2f"), ("baseline_mcd", "MCDsrc", ".2f"), ("moved_right", "moved", ".2f"),
                     ("progress", "progress", ".2f"), ("speaker_similarity_target", "spk_tgt", ".3f")]


def _generated_paths(generated: str, refs: dict, problems: list[str]) -> dict:
    """id -> reconstruction path for ``vae --generated``."""
    if os.path.isfile(generated) or (os.path.isdir(generated)
                                     and os.path.isfile(os.path.join(generated, "results.jsonl"))):
        rows, bad = read_rows(generated, "--generated results", need=("audio",))
        problems += bad
        found = {rid: r["audio"] for rid, r in rows.items()}
        if os.path.isfile(generated):
            return found
    elif os.path.isdir(generated):
        found = {}
    else:
        raise InputError(f"--generated {generated}: no such file or folder")
    for rid, r in refs.items():
        if rid not in found:
            stem = os.path.splitext(os.path.basename(r["audio"]))[0]
            for cand in (os.path.join(generated, f"{rid}.wav"), os.path.join(generated, f"{stem}.wav")):
                if os.path.isfile(cand):
                    found[rid] = cand
                    break
    return found


JUDGE_COLUMNS = [("judge_wer", "J_WER", ".3f"), ("judge_ref_wer", "J_refWER", ".3f")]


def add_judge(args, report: dict, items: list, what: str) -> None:
    """The Whisper judge (:mod:`unitok_jax.eval.whisper`) on ``items`` ``(id, text, generated wave, reference
    wave)``: per-row ``judge_wer`` / ``judge_cer`` / ``judge_transcript`` on the generated speech and
    ``judge_ref_*`` on the reference, and ``report["judge"]``: the corpus rates of both (``generated``,
    ``reference``) and their ratio (``wer_ratio``, ``cer_ratio``; generated / reference). Nothing with
    ``--judge none`` or without items (no reference text)."""
    if args.judge == "none":
        return
    from unitok_jax.eval import whisper

    if not items:
        report["judge"] = {"model": whisper.JUDGE_NAME, "items": 0, "note": f"no {what} with a reference text"}
        return
    gen = whisper.judge([(i, t, g) for i, t, g, _ in items])
    ref = whisper.judge([(i, t, r) for i, t, _, r in items])
    by_id = {r["id"]: r for r in report["rows"]}
    for g, r in zip(gen["rows"], ref["rows"]):
        by_id[g["id"]].update(judge_wer=g["wer"], judge_cer=g["cer"], judge_transcript=g["transcript"],
                              judge_ref_wer=r["wer"], judge_ref_cer=r["cer"], judge_ref_transcript=r["transcript"])

    def ratio(a, b):
        return None if a is None or not b else a / b

    report["judge"] = {"model": whisper.JUDGE_NAME, "items": len(items), "generated": gen["corpus"],
                       "reference": ref["corpus"],
                       "wer_ratio": ratio(gen["corpus"]["wer"], ref["corpus"]["wer"]),
                       "cer_ratio": ratio(gen["corpus"]["cer"], ref["corpus"]["cer"])}
    for k in ("judge_wer", "judge_cer", "judge_ref_wer", "judge_ref_cer"):
        report["mean"][k] = M.summarize([r for r in report["rows"] if r.get(k) is not None], [k]).get(k)


def judge_line(report: dict) -> str | None:
    j = report.get("judge")
    if not j or not j.get("items"):
        return None if not j else f"judge ({j['model']}): {j['note']}"
    g, r = j["generated"], j["reference"]
    return (f"judge ({j['model']}, {j['items']} items, corpus rates): generated WER {_fmt(g['wer'], '.4f')} CER "
            f"{_fmt(g['cer'], '.4f')}; reference WER {_fmt(r['wer'], '.4f')} CER {_fmt(r['cer'], '.4f')}; "
            f"ratio WER {_fmt(j['wer_ratio'], '.2f')} CER {_fmt(j['cer_ratio'], '.2f')}")


def cmd_vae(args) -> int:
    problems: list[str] = []
    refs, bad = read_rows(args.reference, "--reference", need=("audio",), split=args.split)
    problems += bad
    gen = _generated_paths(args.generated, refs, problems)
    if not refs:
        raise InputError(f"--reference {args.reference}: no usable lines")
    load = AudioCache()
    rows, judged = [], []
    for rid, r in refs.items():
        if rid not in gen:
            rows.append({"id": rid, "error": f"no reconstruction for this id in {args.generated}"})
            continue
        try:
            ref, out = load(r["audio"]), load(gen[rid])
        except ValueError as e:
            rows.append({"id": rid, "error": str(e)})
            continue
        row = M.evaluate_vae([(rid, ref, out)], SR, metrics=args.metrics)["rows"][0]
        row.update(reference=r["audio"], generated=gen[rid])
        rows.append(row)
        if isinstance(r.get("text"), str):
            judged.append((rid, r["text"], out, ref))
        _plot(args.plots, rid, out, ref, f"{rid}: reconstruction vs reference", problems)
    report = M._report(rows, list(args.metrics))
    add_judge(args, report, judged, "reference line")
    return _finish(args, "vae", report, problems, {"reference": args.reference, "generated": args.generated},
                   [c for c in VAE_COLUMNS if c[0] in args.metrics or c[0] == "reference_seconds"]
                   + (JUDGE_COLUMNS if report.get("judge", {}).get("items") else []))


def read_results(args, need: tuple) -> tuple[dict, dict, list, list]:
    """(results, request rows, ids, problems) of a scoring command: the ``--results`` rows (each with the fields
    ``need``), the optional ``--requests`` rows, the ids to score (every result, then each requested id without a
    result) and the problems of unusable lines. Raises InputError when nothing is usable."""
    results, problems = read_rows(args.results, "--results", need=need)
    req_rows = {}
    if args.requests:
        req_rows, bad = read_rows(args.requests, "--requests")
        problems = problems + bad
    ids = list(results) + [rid for rid in req_rows if rid not in results]
    if not ids:
        raise InputError(f"--results {args.results}: no usable lines")
    return results, req_rows, ids, problems


def cmd_tts(args) -> int:
    results, req_rows, ids, problems = read_results(args, ("audio",))
    refs, bad = read_rows(args.reference, "--reference", need=("audio",))
    problems += bad
    load = AudioCache()
    items, failed, judged = [], [], []
    for rid in ids:
        if rid not in results:
            failed.append({"id": rid, "error": f"requested but no result in {args.results}"})
            continue
        if rid not in refs:
            failed.append({"id": rid, "error": f"no reference for this id in {args.reference}"})
            continue
        ref_row = refs[rid]
        prompt_path = req_rows.get(rid, {}).get("prompt_wav") or ref_row.get("prompt_wav") \
            or results[rid].get("prompt_wav")
        try:
            item = {"id": rid, "generated": load(results[rid]["audio"]), "reference": load(ref_row["audio"])}
            if prompt_path:
                item["prompt"] = load(prompt_path)
                item["voice"] = str(ref_row["speaker"]) if "speaker" in ref_row else f"prompt:{prompt_path}"
        except ValueError as e:
            failed.append({"id": rid, "error": str(e)})
            continue
        items.append(item)
        text = req_rows.get(rid, {}).get("text") or ref_row.get("text") or results[rid].get("text")
        if isinstance(text, str):
            judged.append((rid, text, item["generated"], item["reference"]))
        _plot(args.plots, rid, item["generated"], item["reference"], f"{rid}: generated vs reference", problems)
    report = M.evaluate_tts(items, SR)
    by_id = {r["id"]: r for r in report["rows"] + failed}
    rows = [by_id[rid] for rid in ids]
    for r in rows:
        if "error" not in r:
            r.update(generated=results[r["id"]]["audio"], reference=refs[r["id"]]["audio"])
    report = M._report(rows, list(M.TTS_KEYS))
    add_judge(args, report, judged, "TTS item")
    return _finish(args, "tts", report, problems,
                   {"results": args.results, "reference": args.reference, "requests": args.requests},
                   TTS_COLUMNS + (JUDGE_COLUMNS if report.get("judge", {}).get("items") else []))


def cmd_asr(args) -> int:
    M._require("jiwer")
    results, req_rows, ids, problems = read_results(args, ("text",))
    manifest, bad = read_rows(args.manifest, "--manifest", need=("text",))
    problems += bad
    pairs, failed = [], []
    for rid in ids:
        if rid not in results:
            failed.append({"id": rid, "error": f"requested but no result in {args.results}"})
        elif rid not in manifest:
            failed.append({"id": rid, "error": f"no reference text for this id in {args.manifest}"})
        else:
            pairs.append((rid, manifest[rid]["text"], results[rid]["text"]))
    scored = M.evaluate_asr(pairs, normalize=not args.no_normalize)
    by_id = {r["id"]: r for r in scored["rows"] + failed}
    report = M._report([by_id[rid] for rid in ids], list(M.ASR_KEYS))
    report["corpus"] = scored["corpus"]
    report["normalized"] = not args.no_normalize
    return _finish(args, "asr", report, problems, {"results": args.results, "manifest": args.manifest,
                                                  "requests": args.requests}, ASR_COLUMNS)


def print_edit_types(report: dict, file=None) -> None:
    """The per-edit-type summary: counts, CoT corpus WER / CER and exact-match rate (semantic), MCD against the
    target and the source's (do-nothing) MCD, fraction moved the right way and mean progress (acoustic)."""
    file = file or sys.stdout
    lines = [M.edit_summary(t, v) for t, v in report["by_type"].items()] + [M.edit_summary("all", report)]
    width = max([len(x["name"]) for x in lines] + [9])
    cw = [max(len(h), 7) for _, h, _ in EDIT_TYPE_COLUMNS]
    head = f"\n{'edit type':<{width}}  " + "  ".join(f"{h:>{w}}" for (_, h, _), w in zip(EDIT_TYPE_COLUMNS, cw))
    print(head, file=file)
    print("-" * (len(head) - 1), file=file)
    for x in lines:
        print(f"{x['name']:<{width}}  " + "  ".join(f"{_fmt(x[k], s):>{w}}"
                                                     for (k, _, s), w in zip(EDIT_TYPE_COLUMNS, cw)), file=file)


def cmd_edit(args) -> int:
    M._require("jiwer")
    from unitok_jax.text import strip_special_tokens

    results, req_rows, ids, problems = read_results(args, ("audio",))
    manifest, bad = read_rows(args.manifest, "--manifest", need=("audio", "target_audio", "edit_type"),
                              extra_path_keys=("target_audio",))
    problems += bad
    load = AudioCache()
    items, failed = [], []  # failed: no pair, so no edit type; other failures go through evaluate_edit
    for rid in ids:
        res, pair = results.get(rid), manifest.get(rid)
        if pair is None:
            why = "no result in " + args.results if res is None else "no edit pair for this id in " + args.manifest
            failed.append({"id": rid, "error": why})
            continue
        etype = pair["edit_type"]
        markup = pair.get("target_markup")
        error = None
        if res is None:
            error = f"requested but no result in {args.results}"
        elif markup is not None and not isinstance(markup, str):
            error = f"target_markup in {args.manifest} must be a string or null"
        elif markup is None and (pair.get("edit_kind") == "semantic" or etype in M.SEMANTIC_EDITS):
            error = f"semantic edit without a target_markup in {args.manifest}"
        if error is not None:
            items.append({"id": rid, "edit_type": etype, "error": error})
            continue
        # the raw <cot_text> markup when sample.py wrote it, else the transcript (markup stripped on both sides)
        raw = "target_markup" in res
        cot = res.get("target_markup") if raw else res.get("target_transcript")
        try:
            no_audio = isinstance(res.get("seconds"), (int, float)) and res["seconds"] <= 0
            items.append({"id": rid, "edit_type": etype, "source": load(pair["audio"]),
                          "target": load(pair["target_audio"]), "edited": None if no_audio else load(res["audio"]),
                          "cot": cot if isinstance(cot, str) else None,
                          "reference_cot": None if markup is None else (markup if raw
                                                                        else strip_special_tokens(markup))})
        except ValueError as e:
            items.append({"id": rid, "edit_type": etype, "error": str(e)})
    report = M.evaluate_edit(items, SR, normalize=not args.no_normalize)
    for r in report["rows"]:
        if "error" not in r:
            rid = r["id"]
            r.update(edited=results[rid]["audio"], source=manifest[rid]["audio"],
                     target=manifest[rid]["target_audio"], cot_markup="target_markup" in results[rid])
    by_id = {r["id"]: r for r in report["rows"] + failed}
    report["rows"] = [by_id[rid] for rid in ids]
    report["count"] += len(failed)
    report["normalized"] = not args.no_normalize
    return _finish(args, "edit", report, problems, {"results": args.results, "manifest": args.manifest,
                                                   "requests": args.requests}, EDIT_COLUMNS, after=print_edit_types)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unitok_jax.eval", description=__doc__.split("\n\n")[0],
                                 epilog="Input formats: see the module docstring (python -m pydoc "
                                        "unitok_jax.eval.__main__).")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vae", help="VAE reconstruction: PESQ-WB, STOI, log-mel L1, SI-SDR")
    v.add_argument("--reference", required=True, help='manifest JSONL {"id", "audio"} (or {"id", "wav"})')
    v.add_argument("--generated", required=True,
                   help="folder of reconstructions (<id>.wav or <reference stem>.wav) or results.jsonl {id, wav}")
    v.add_argument("--split", help="only manifest lines with this 'split'")
    v.add_argument("--metrics", default=",".join(M.VAE_KEYS),
                   help=f"comma-separated subset of {','.join(M.VAE_KEYS)}")
    v.add_argument("--plots", help="write <id>.png mel comparisons into this folder")
    t = sub.add_parser("tts", help="TTS: MCD-DTW, duration error, copy-the-prompt baseline, speaker proxy")
    t.add_argument("--results", required=True, help="sample.py tts results.jsonl (or its folder)")
    t.add_argument("--reference", required=True,
                   help='JSONL {"id", "audio", "speaker"?, "prompt_wav"?}: the same sentence in the prompt voice')
    t.add_argument("--requests", help="sample.py tts requests JSONL (prompt_wav; requested ids must have results)")
    t.add_argument("--plots", help="write <id>.png mel comparisons into this folder")
    a = sub.add_parser("asr", help="ASR: WER and CER after normalisation")
    a.add_argument("--results", required=True, help="sample.py asr results.jsonl (or its folder)")
    a.add_argument("--manifest", required=True, help='manifest JSONL {"id", "text"} with the reference texts')
    a.add_argument("--requests", help="sample.py asr requests JSONL (requested ids must have results)")
    a.add_argument("--no-normalize", action="store_true", help="score raw texts (whitespace collapsed only)")
    e = sub.add_parser("edit", help="speech editing per edit type: CoT WER/CER, MCD vs the target, direction of "
                                    "acoustic edits")
    e.add_argument("--results", required=True, help="sample.py edit results.jsonl (or its folder)")
    e.add_argument("--manifest", required=True,
                   help="edit-corpus manifest JSONL (build_edit_corpus heldout.jsonl): {id, audio, target_audio, "
                        "edit_type, target_markup}")
    e.add_argument("--requests", help="sample.py edit requests JSONL (requested ids must have results)")
    e.add_argument("--no-normalize", action="store_true", help="score raw CoT texts (whitespace collapsed only)")
    for p in (v, t):
        p.add_argument("--judge", choices=("whisper", "none"), default="whisper",
                       help="independent ASR judge of the generated speech and of the reference audio, on the items "
                            "with a reference text (default: whisper, Whisper tiny.en offline from the eval extra)")
    for p in (v, t, a, e):
        p.add_argument("--json", help="write the report here (JSON, atomically)")
        p.add_argument("--quiet", action="store_true", help="no table")
    args = ap.parse_args(argv)
    if args.command == "vae":
        args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = sorted(set(args.metrics) - set(M.VAE_KEYS))
        if unknown or not args.metrics:
            ap.error(f"--metrics: unknown {unknown}; choose from {','.join(M.VAE_KEYS)}")
    try:
        return {"vae": cmd_vae, "tts": cmd_tts, "asr": cmd_asr, "edit": cmd_edit}[args.command](args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except M.EvalDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
