"""Speech manifests: JSONL, one utterance per line: ``{"id", "audio", "text", "speaker"}`` (+ optional
``"duration"`` in seconds, ``"split"``, ``"latents"``: a file of the latent cache, see
:mod:`unitok_jax.data.latent_cache`). Relative audio / latents paths are relative to the manifest file.

Reading is forgiving by design (training must go on): a broken line, a missing or mistyped field is reported
with its line number and skipped; :class:`Manifest` keeps the count and the messages.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from unitok_jax.io import write_jsonl

FIELDS = {"id": (str, int), "audio": str, "text": str, "speaker": (str, int)}
# latents: a latent-cache file (LM stage); target_audio: an edit pair's target (build_edit_corpus), target_latents
# its latent-cache file; teacher: the
# teacher features of tokenizer stage S1 (a .npy, see unitok_jax.data.pipeline.load_teacher)
OPTIONAL = {"duration": (int, float), "split": str, "latents": str, "target_audio": str, "target_latents": str,
            "teacher": str}
PATH_KEYS = ("audio", "latents", "target_audio", "target_latents", "teacher")  # relative to the manifest file


@dataclasses.dataclass
class Manifest:
    records: list[dict]
    path: str = ""
    errors: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def split(self, name: str) -> "Manifest":
        """The records whose ``split`` field equals ``name``."""
        return Manifest([r for r in self.records if r.get("split") == name], self.path, self.errors)


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))


def read_jsonl(path: str, required: dict, optional: dict = None, *, path_keys: tuple = ()):
    """Yield ``(line_number, where, record, problem)`` for each non-empty line of a JSONL file of objects.

    ``required`` / ``optional``: field -> accepted type(s). ``problem`` is None for a valid line (then ``record``
    has ``id`` as a string, unique so far, and the ``path_keys`` fields made absolute relative to the file), else
    a message naming what is wrong. Shared by manifests and ``sample.py`` request files."""
    optional = optional or {}
    seen = set()
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for n, raw_bytes in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, where, None, f"not valid UTF-8 (byte {e.start})"
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as e:
                yield n, where, None, f"not valid JSON ({getattr(e, 'msg', e)})"
                continue
            if not isinstance(obj, dict):
                yield n, where, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            problems = [f"missing field {k!r}" for k in required if k not in obj]
            problems += [f"field {k!r} must be {_type_name(t)}" for k, t in {**required, **optional}.items()
                         if k in obj and (not isinstance(obj[k], t) or isinstance(obj[k], bool) and bool not in
                                          (t if isinstance(t, tuple) else (t,)))]
            if problems:
                yield n, where, None, "; ".join(problems)
                continue
            rid = str(obj["id"])
            if rid in seen:
                yield n, where, None, f"duplicate id {rid!r}"
                continue
            seen.add(rid)
            rec = dict(obj, id=rid)
            for k in path_keys:
                if k in rec and not os.path.isabs(rec[k]):
                    rec[k] = os.path.join(base, rec[k])
            yield n, where, rec, None


def read_manifest(path: str, *, require_text: bool = True, add_durations: bool = False) -> Manifest:
    """Parse a manifest. ``require_text=False`` accepts records without ``text`` (VAE training).
    ``add_durations``: read missing durations from the audio headers (soundfile; no decoding)."""
    records, errors = [], []
    required = {k: t for k, t in FIELDS.items() if require_text or k != "text"}
    optional = {**OPTIONAL, **({} if require_text else {"text": str})}
    for _, where, rec, problem in read_jsonl(path, required, optional, path_keys=PATH_KEYS):
        if problem is not None:
            errors.append(f"{where}: {problem}")
            continue
        rec["speaker"] = str(rec["speaker"])
        if "duration" in rec and not (math.isfinite(rec["duration"]) and rec["duration"] >= 0):
            errors.append(f"{where}: field 'duration' must be a finite number of seconds >= 0, got {rec['duration']}")
            continue
        if add_durations and "duration" not in rec:
            d = audio_duration(rec["audio"])
            if d is None:
                errors.append(f"{where}: cannot read audio {rec['audio']}")
                continue
            rec["duration"] = d
        records.append(rec)
    return Manifest(records, path, errors)


def spread_order(total: int, n: int) -> list[int]:
    """Indices ``0..total-1``: first ``n`` spread evenly over them, then the rest in order (a fixed, representative
    choice of ``n`` records that falls back on the others when some are unreadable)."""
    first = list(dict.fromkeys(int(i * total / n) for i in range(n))) if n > 0 else []
    chosen = set(first)
    return first + [i for i in range(total) if i not in chosen]


def audio_duration(path: str) -> Optional[float]:
    """Seconds of audio from the file header, or None if unreadable."""
    import soundfile as sf

    try:
        info = sf.info(path)
        return info.frames / float(info.samplerate)
    except (RuntimeError, OSError, ValueError):  # soundfile raises LibsndfileError (a RuntimeError)
        return None


def write_manifest(path: str, records: list[dict]) -> None:
    """Write records as JSONL atomically (:func:`unitok_jax.io.write_jsonl`)."""
    write_jsonl(path, records)
