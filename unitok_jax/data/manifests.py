"""Manifests for speech corpora already on disk (see :mod:`unitok_jax.data.manifest` for the format).

    python -m unitok_jax.data.manifests librispeech ROOT --out manifest.jsonl   # LibriSpeech or LibriTTS
    python -m unitok_jax.data.manifests ljspeech ROOT --out manifest.jsonl
    python -m unitok_jax.data.manifests folder ROOT --out manifest.jsonl        # *.wav + same-stem *.txt

Layouts:
  librispeech: ``speaker/chapter/*.trans.txt`` (lines ``<id> <TEXT>``) next to ``<id>.flac`` (LibriSpeech), or
    ``speaker/chapter/<id>.wav`` with ``<id>.normalized.txt`` (else ``<id>.original.txt``; LibriTTS). The speaker
    is the id's first ``-``/``_`` field.
  ljspeech: ``metadata.csv`` (``id|text|normalized text``; the normalized text is used when present) and
    ``wavs/<id>.wav``; one speaker (``--speaker``, default ``ljspeech``).
  folder: any ``*.wav`` / ``*.flac`` with a same-stem ``*.txt`` anywhere below ROOT; speaker = parent folder name,
    id = path below ROOT without extension.

A bad item (missing transcript or audio, empty text, unreadable audio, duplicate id) is skipped and counted, with
one warning per build naming the counts and a few examples; nothing found at all is an error. Audio paths are
written relative to the manifest when the audio lies below its folder, absolute otherwise.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
import warnings
from typing import Callable, Iterator, Optional, Sequence

from unitok_jax.data.manifest import audio_duration, write_manifest

AUDIO_EXTS = (".flac", ".wav")  # preference order when both exist


class ManifestBuildError(ValueError):
    """Nothing usable under the corpus root (or the root is missing)."""


@dataclasses.dataclass
class BuildResult:
    """Records (absolute audio paths, sorted by id) and the skipped items: reason -> count, and examples."""

    records: list[dict]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list[str] = dataclasses.field(default_factory=list)

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{reason}: {what}")

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        yield folder, sorted(files)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return " ".join(f.read().split())


def _speaker_from_id(uid: str) -> str:
    return re.split(r"[-_]", uid, maxsplit=1)[0]


def _finish(result: BuildResult, candidates: list[tuple[str, str, str, str]], root: str, durations: bool,
            kind: str) -> BuildResult:
    """Turn ``(id, audio, text, speaker)`` candidates into records, skipping bad ones; warn; error if none."""
    seen = set()
    for uid, audio, text, speaker in sorted(candidates):
        if not text:
            result.skip("empty transcript", audio)
            continue
        if uid in seen:
            result.skip("duplicate id", f"{uid} ({audio})")
            continue
        rec = {"id": uid, "audio": audio, "text": text, "speaker": speaker}
        if durations:
            d = audio_duration(audio)
            if d is None:
                result.skip("unreadable audio", audio)
                continue
            rec["duration"] = round(d, 4)
        seen.add(uid)
        result.records.append(rec)
    if result.skipped:
        warnings.warn(f"{kind} {root}: skipped {sum(result.skipped.values())} item(s): {result.summary()} "
                      f"(e.g. {'; '.join(result.examples)})", stacklevel=3)
    if not result.records:
        extra = f" (skipped: {result.summary()})" if result.skipped else ""
        raise ManifestBuildError(f"no usable {kind} utterances found under {root}{extra}")
    return result


def _check_root(root: str) -> str:
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise ManifestBuildError(f"{root} is not a folder")
    return root


def librispeech(root: str, *, durations: bool = True) -> BuildResult:
    """LibriSpeech (``*.trans.txt`` + ``.flac``) and LibriTTS (``.wav`` + ``.normalized.txt``) below ``root``."""
    root = _check_root(root)
    result, cands = BuildResult([]), []
    for folder, files in _walk(root):
        names = set(files)
        audio = {}
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in AUDIO_EXTS and (stem not in audio or AUDIO_EXTS.index(ext.lower()) <
                                              AUDIO_EXTS.index(os.path.splitext(audio[stem])[1].lower())):
                audio[stem] = f
        texts = {}
        for f in files:
            if f.endswith(".trans.txt"):
                with open(os.path.join(folder, f), encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        parts = line.strip().split(maxsplit=1)
                        if parts:
                            texts[parts[0]] = parts[1] if len(parts) > 1 else ""
        for f in files:
            for suffix in (".normalized.txt", ".original.txt"):
                if f.endswith(suffix):
                    stem = f[:-len(suffix)]
                    if stem not in texts and (suffix == ".normalized.txt" or stem + ".normalized.txt" not in names):
                        texts[stem] = _read_text(os.path.join(folder, f))
        for stem, text in texts.items():
            if stem not in audio:
                result.skip("missing audio", os.path.join(folder, stem))
        for stem, f in audio.items():
            if stem not in texts:
                result.skip("missing transcript", os.path.join(folder, f))
                continue
            cands.append((stem, os.path.join(folder, f), " ".join(texts[stem].split()), _speaker_from_id(stem)))
    return _finish(result, cands, root, durations, "LibriSpeech/LibriTTS")


def ljspeech(root: str, *, speaker: str = "ljspeech", durations: bool = True) -> BuildResult:
    """LJSpeech: ``root/metadata.csv`` and ``root/wavs/<id>.wav``."""
    root = _check_root(root)
    meta = os.path.join(root, "metadata.csv")
    if not os.path.isfile(meta):
        raise ManifestBuildError(f"{meta} not found (expected an LJSpeech folder with metadata.csv and wavs/)")
    wav_dir = os.path.join(root, "wavs")
    result, cands, listed = BuildResult([]), [], set()
    with open(meta, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("|")
            if len(fields) < 2 or not fields[0].strip():
                result.skip("malformed metadata line", f"{meta}:{n}")
                continue
            uid = fields[0].strip()
            listed.add(uid)
            text = fields[2] if len(fields) > 2 and fields[2].strip() else fields[1]
            audio = os.path.join(wav_dir, uid + ".wav")
            if not os.path.isfile(audio):
                result.skip("missing audio", audio)
                continue
            cands.append((uid, audio, " ".join(text.split()), speaker))
    if os.path.isdir(wav_dir):
        for f in sorted(os.listdir(wav_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() == ".wav" and stem not in listed:
                result.skip("missing transcript", os.path.join(wav_dir, f))
    return _finish(result, cands, root, durations, "LJSpeech")


def folder(root: str, *, durations: bool = True) -> BuildResult:
    """Every ``*.wav`` / ``*.flac`` below ``root`` with a same-stem ``*.txt``; speaker = parent folder name."""
    root = _check_root(root)
    result, cands = BuildResult([]), []
    for here, files in _walk(root):
        names = set(files)
        stems_with_audio = set()
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() not in AUDIO_EXTS:
                continue
            stems_with_audio.add(stem)
            path = os.path.join(here, f)
            if stem + ".txt" not in names:
                result.skip("missing transcript", path)
                continue
            uid = os.path.relpath(os.path.join(here, stem), root).replace(os.sep, "/")
            cands.append((uid, path, _read_text(os.path.join(here, stem + ".txt")), os.path.basename(here)))
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext == ".txt" and stem not in stems_with_audio:
                result.skip("missing audio", os.path.join(here, f))
    return _finish(result, cands, root, durations, "folder")


BUILDERS: dict[str, Callable[..., BuildResult]] = {"librispeech": librispeech, "ljspeech": ljspeech,
                                                   "folder": folder}


def write(records: Sequence[dict], out: str) -> None:
    """Write ``records`` to ``out`` (atomic), audio paths relative to ``out``'s folder when below it."""
    base = os.path.dirname(os.path.abspath(out))
    rows = []
    for r in records:
        rel = os.path.relpath(r["audio"], base)
        rows.append(dict(r, audio=r["audio"] if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel))
    write_manifest(out, rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unitok_jax.data.manifests",
                                description="Write a JSONL speech manifest for a corpus on disk.")
    p.add_argument("layout", choices=sorted(BUILDERS), help="corpus layout")
    p.add_argument("root", help="corpus folder")
    p.add_argument("--out", required=True, help="manifest file to write (JSONL)")
    p.add_argument("--speaker", default="ljspeech", help="speaker name for ljspeech (single speaker)")
    p.add_argument("--no-durations", action="store_true",
                   help="do not read audio headers (faster; no duration field, unreadable files not detected)")
    args = p.parse_args(argv)
    kwargs = {"durations": not args.no_durations}
    if args.layout == "ljspeech":
        kwargs["speaker"] = args.speaker
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = BUILDERS[args.layout](args.root, **kwargs)
    except ManifestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    write(result.records, args.out)
    speakers = len({r["speaker"] for r in result.records})
    hours = sum(r.get("duration", 0.0) for r in result.records) / 3600
    print(f"{args.out}: {len(result.records)} utterances, {speakers} speaker(s)"
          + (f", {hours:.2f} h" if kwargs["durations"] else "")
          + (f"; skipped {sum(result.skipped.values())} ({result.summary()})" if result.skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
