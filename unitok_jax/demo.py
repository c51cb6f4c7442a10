"""``make demo``: tiny models trained end to end on a locally synthesised speech corpus, on CPU.

    python -m unitok_jax.demo --out demo [--quick] [--set vae.KEY=VALUE ...] [--set lm.KEY=VALUE ...]

Phases (each a subprocess running the project's own command line; a phase whose output exists is skipped, so a
killed run resumes where it stopped, and training itself resumes from its last checkpoint). The configs are the
package's own (:mod:`unitok_jax.configs`), so the demo needs no checkout:

1. ``corpus``       python -m unitok_jax.data.build_corpus (eSpeak NG; train.jsonl + heldout.jsonl, 2 held-out voices;
                    the handwritten sentences plus thousands composed from templates, training split only)
   ``edit_corpus``  python -m unitok_jax.data.build_edit_corpus (edit pairs over the same split of sentences)
2. ``vae``          python -m unitok_jax.cli.train --config configs/vae.py:tiny ... (train.py's command; stage S0;
                    exports the AudioVAE)
   ``teacher``      python -m unitok_jax.data.teacher (Whisper tiny.en encoder features of training utterances, 50 Hz,
                    PCA-projected to the semantic module's width; the S1 teacher)
3. ``s1``           python -m unitok_jax.cli.train --config configs/vae.py:tiny --config.train.objective=s1 ... (S1: the
                    semantic path distils the teacher; exports the AudioVAE the LM starts from)
   ``latents``      python -m unitok_jax.data.latent_cache (the frozen VAE's posterior of every training utterance,
                    and of the source and target of every training edit pair; S1 leaves the encoder as it is)
4. ``lm``           python -m unitok_jax.cli.train --config configs/lm.py:tiny ... --config.data.source=latents
                    --config.data.edit_manifest=... (LLM + flow head on TTS, ASR and edit sequences)
5. ``reconstruct``  python -m unitok_jax.cli.sample reconstruct: every held-out utterance through the VAE
   ``asr``          python -m unitok_jax.cli.sample asr: every held-out utterance
   ``tts``          python -m unitok_jax.cli.sample tts: each held-out sentence in a held-out voice (the two take turns;
                    ``--set sample.tts_voices=2``: in both), prompted with that voice saying another sentence
   ``edit``         python -m unitok_jax.cli.sample edit: every held-out edit pair (its source speech and instruction)
6. ``eval``         python -m unitok_jax.eval vae | asr | tts | edit (JSON reports; vae and tts with the Whisper tiny.en
                    judge on the generated speech and on the eSpeak originals, the floor)
7. ``report``       OUT/report.md (numbers, recipe, timings, machine), mel-spectrogram PNGs, example wavs

Everything intermediate lives in ``OUT/work``; the results are ``OUT/report.md``, ``OUT/eval/*.json``,
``OUT/mel_tts.png``, ``OUT/mel_reconstruction.png`` and ``OUT/wavs/``. ``--quick`` runs the same chain with a
handful of utterances and a few training steps (the end-to-end test). ``--set`` overrides the recipe's config values
(``vae.train.steps=800``, ``lm.train.lr=0.002``, ...); the recipe is recorded in ``OUT/work/recipe.json`` and a
re-run with a different recipe into the same folder is refused (use another ``--out`` or ``--fresh``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional

from unitok_jax import configs
from unitok_jax.io import write_json, write_jsonl, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------ recipes

# Config overrides on top of configs/vae.py:tiny and configs/lm.py:tiny (train.py --config.KEY=VALUE).
# The tiny VAE and LM widened to 128 with 4 layers (configs/*.py:tiny are 64 wide, 2 layers): the best quality per CPU
# minute in the recipe search (README, "What the demo reaches").
VAE_H128 = {f"vae.{part}.backbone.{k}": v for part in ("enc_kwargs", "dec_kwargs")
            for k, v in (("hidden_size", 128), ("intermediate_size", 256), ("num_hidden_layers", 4))}
LLM_H128 = {f"model.bailingmm.llm_config.{k}": v for k, v in (
    ("hidden_size", 128), ("num_hidden_layers", 4), ("intermediate_size", 256), ("moe_intermediate_size", 128),
    ("head_dim", 32))}

FULL_VAE = {
    **VAE_H128,
    # batch 16 x 1800 steps: STOI 0.803 and the judge's WER on the reconstructions 1.43x the originals' (batch 4 x
    # 4000 steps of about the same CPU time: 0.767, 1.80x; docs/demo.md, "VAE: the first gate")
    "train.steps": 1800,
    "data.batch_size": 16,
    "data.crop_seconds": 1.0,
    "train.lr": 1e-3,
    # mel + KL only, no GAN: at 800 steps STOI 0.692 vs 0.664 with the GAN from step 400, and the judge's WER on the
    # reconstructions 103% vs 109%; without the GAN the step runs no discriminator (16x cheaper)
    "train.adv_start_step": 10**9,
    "sample_every": 0,
    "tensorboard": False,
    "checkpoint.every_steps": 300,
    "log_every": 20,
}
FULL_LM = {
    **LLM_H128,
    # 4 experts: every expert on every token (one batched matmul) beats the CPU grouped matmul's loop over tiles,
    # 477 vs 568 ms a step (bench/train.py --quick --sizes demo, idle EPYC); the same function
    "model.moe_impl": "dense",
    # packed rows (issue 18): 8 rows of 256 tokens / 96 patches, each holding about two sequences (14.7 a step,
    # 30% padding against 8 and 47% with length buckets): 1.42x the real tokens per second of the buckets, one
    # compiled step (bench/train.py --lm-plan, docs/benchmarks.md). 1500 steps took 21 minutes in the full demo
    # against 29.5 for 2000 bucketed ones, saw about 1.4x their sequences and scored the same (docs/demo.md)
    "data.pack": True,
    "data.seq_len": 256,
    "data.max_patches": 96,
    "train.steps": 1500,
    "data.batch_size": 8,
    "data.tts_fraction": 0.5,
    "data.edit_fraction": 0.25,  # a whole step of edit pairs a quarter of the time
    "train.lr": 2e-3,
    "train.warmup_steps": 50,
    "tensorboard": False,
    "checkpoint.every_steps": 200,
    "log_every": 20,
}
# The smoke test: the same chain at the smallest sizes that still exercise it, one compilation per program.
# Stage S1: the semantic path (decoder fc2 + semantic module) distils Whisper tiny.en's encoder features, projected
# onto their first 48 principal components (the tiny semantic module's width; docs/demo.md).
FULL_S1 = {
    "train.objective": "s1",
    "train.steps": 300,
    "data.batch_size": 8,
    "data.crop_seconds": 2.0,
    "train.lr": 1e-3,
    "sample_every": 0,
    "tensorboard": False,
    "checkpoint.every_steps": 100,
    "log_every": 20,
}
QUICK_S1 = {**FULL_S1, "train.steps": 2, "data.batch_size": 2, "data.crop_seconds": 0.5,
            "checkpoint.every_steps": 1000, "log_every": 1}
QUICK_VAE = {
    "train.steps": 2,
    "data.batch_size": 2,
    "data.crop_seconds": 0.5,
    "sample_every": 0,
    "tensorboard": False,
    "checkpoint.every_steps": 1000,
    "log_every": 1,
}
QUICK_LM = {
    "model.moe_impl": "dense",  # as FULL_LM, so the smoke test runs the path the full recipe uses
    "train.steps": 2,
    "data.batch_size": 2,
    "data.pack": True,  # as FULL_LM
    "data.seq_len": 320,  # an edit row holds source and target speech (up to 2 x 5.3 s here)
    "data.max_patches": 128,
    "data.edit_fraction": 0.3,  # with seed 0: step 0 is an edit step, step 1 a TTS/ASR step
    "train.warmup_steps": 1,
    "tensorboard": False,
    "checkpoint.every_steps": 1000,
    "log_every": 1,
}

RECIPES = {
    "full": {
        # composed: template sentences added to the training split; composed_readers: seen voices reading each
        "corpus": {"sentences": None, "composed": 4000, "composed_readers": 1},
        # dim: the semantic module's width (configs/vae.py:tiny n_state); limit: training utterances encoded
        "teacher": {"dim": 48, "limit": 600},
        "s1": FULL_S1,
        "edit": {"pairs": 400},
        "vae": FULL_VAE,
        "lm": FULL_LM,
        "lm_source": "latents",
        # tts_voices: held-out voices each held-out sentence is synthesised in (1: the voices take turns)
        # edit_max_patches: the edit loop's cap (10 s; the longest targets, slowed-down sentences, are ~8 s)
        "sample": {"steps": 10, "cfg": 2.0, "batch_size": 8, "max_patches": None, "max_new_tokens": 96,
                   "tts_voices": 1, "edit_max_patches": 100},
        "examples": 4,
    },
    "quick": {
        "corpus": {"sentences": 12, "composed": 8, "composed_readers": 1},
        "teacher": {"dim": 48, "limit": 6},
        "s1": QUICK_S1,
        "edit": {"pairs": 40},
        "vae": QUICK_VAE,
        "lm": QUICK_LM,
        "lm_source": "latents",
        "sample": {"steps": 2, "cfg": 2.0, "batch_size": 8, "max_patches": 6, "max_new_tokens": 8,
                   "tts_voices": 1, "edit_max_patches": 6},
        "examples": 2,
        # compile fast, run slow: the smoke test's processes spend most of their time compiling
        "xla_flags": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
    },
}

PHASES = ("corpus", "edit_corpus", "vae", "teacher", "s1", "latents", "lm", "reconstruct", "asr", "tts", "edit",
          "eval", "report")
# Phases of a group run concurrently (the sampling commands and the evaluations are mostly single-threaded).
GROUPS = (("corpus", "edit_corpus"), ("vae", "teacher"), ("s1", "latents"), ("lm",),
          ("reconstruct", "asr", "tts", "edit"), ("eval",), ("report",))
# issue 17's targets: VAE STOI, the judge's WER on reconstructions / on the originals, our ASR's CER, the judge's WER
# on TTS / on the eSpeak renderings, speaker proxy top-1, edit CoT CER
TARGETS = {"stoi": 0.85, "vae_judge_ratio": 1.5, "cer": 0.15, "tts_judge_ratio": 2.0, "speaker_top1": 0.8,
           "cot_cer": 0.25}


@dataclasses.dataclass
class Cmd:
    argv: list
    ok: tuple = (0,)  # accepted exit statuses
    expect: Optional[str] = None  # a file the command must leave behind


@dataclasses.dataclass
class Job:
    """Commands run one after the other; the jobs of a group of phases run concurrently."""

    phase: str
    name: str
    cmds: list
    terminal: bool = False  # prefer this job for the terminal when several run at once
    log: Optional[str] = None
    error: Optional[str] = None


class DemoError(RuntimeError):
    """A phase failed or the output folder cannot be used (printed without a traceback, exit status 1)."""


# ------------------------------------------------------------------------------------------------ helpers


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


GROUPS_SET = ("vae", "s1", "lm", "sample", "corpus", "teacher", "edit")  # --set groups


def build_recipe(quick: bool, sets: list[str]) -> dict:
    recipe = json.loads(json.dumps(RECIPES["quick" if quick else "full"]))
    recipe["mode"] = "quick" if quick else "full"
    for s in sets:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise DemoError(f"--set {s!r}: expected GROUP.KEY=VALUE, GROUP one of {', '.join(GROUPS_SET)}")
        key, value = s.split("=", 1)
        group, name = key.split(".", 1)
        if group not in GROUPS_SET:
            raise DemoError(f"--set {s!r}: unknown group {group!r} ({', '.join(GROUPS_SET)})")
        recipe[group][name] = _parse_value(value)
    return recipe


def _fmt_override(v) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
    return str(v)


def config_flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={_fmt_override(v)}" for k, v in overrides.items()]


def _hms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else \
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _md_cell(text: str, limit: int = 120) -> str:
    """Text for a markdown table cell: no pipes, no control characters, not too long."""
    text = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {"host": platform.node(), "os": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": cores, "memory_gib": round(mem, 1) if mem else None}
    try:
        import jax

        info["jax"] = jax.__version__
        info["device"] = jax.default_backend() if jax.default_backend() == "cpu" else \
            f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    except Exception:  # noqa: BLE001 -- informational only
        pass
    return info


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished child processes."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def default_compile_cache() -> str:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unitok_jax", "jax")


def judge_summary(report: dict) -> dict:
    """The judge's corpus rates in an eval report (``python -m unitok_jax.eval vae|tts``): on the generated speech
    (``wer``, ``cer``), on the references (``floor_wer``, ``floor_cer``) and ``ratio`` (generated / floor WER)."""
    j = report.get("judge") or {}
    g, r = j.get("generated") or {}, j.get("reference") or {}
    return {"model": j.get("model", "no judge"), "wer": g.get("wer"), "cer": g.get("cer"), "floor_wer": r.get("wer"),
            "floor_cer": r.get("cer"), "ratio": j.get("wer_ratio")}


# ------------------------------------------------------------------------------------------------ the demo


class Demo:
    def __init__(self, out: str, recipe: dict, *, quiet: bool = False, setup_seconds: Optional[float] = None,
                 compile_cache: Optional[str] = None):
        self.out = os.path.abspath(out)
        self.work = os.path.join(self.out, "work")
        self.recipe = recipe
        self.quiet = quiet
        self.compile_cache = compile_cache
        self.py = sys.executable
        self.p = {  # paths
            "corpus": os.path.join(self.work, "corpus"),
            "edit_corpus": os.path.join(self.work, "edit_corpus"),
            "vae": os.path.join(self.work, "vae"),
            "teacher": os.path.join(self.work, "teacher"),
            "s1": os.path.join(self.work, "s1"),
            "latents": os.path.join(self.work, "latents"),
            "edit_latents": os.path.join(self.work, "edit_latents"),
            "lm": os.path.join(self.work, "lm"),
            "requests": os.path.join(self.work, "requests"),
            "samples": os.path.join(self.work, "samples"),
            "eval": os.path.join(self.out, "eval"),
        }
        self.timings_path = os.path.join(self.work, "timings.json")
        self.timings: dict = {}
        self.resumed: set = set()
        self.setup_seconds = setup_seconds
        self.commands_path = os.path.join(self.work, "commands.json")
        self.commands: dict[str, list[str]] = {}
        self._fresh_phases: set = set()

    # ---- bookkeeping

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)

    def prepare(self, fresh: bool) -> None:
        if fresh and os.path.isdir(self.work):
            shutil.rmtree(self.work)
            for name in ("eval", "wavs"):
                shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
        os.makedirs(self.work, exist_ok=True)
        rpath = os.path.join(self.work, "recipe.json")
        if os.path.isfile(rpath):
            with open(rpath, encoding="utf-8") as f:
                old = json.load(f)
            if old != self.recipe:
                raise DemoError(f"{self.out} was made with a different recipe ({rpath}); use another --out or "
                                f"pass --fresh to start over")
        else:
            write_json(rpath, self.recipe)
        if os.path.isfile(self.timings_path):
            with open(self.timings_path, encoding="utf-8") as f:
                self.timings = json.load(f)
        self.timings.setdefault("phases", {})
        self.timings.setdefault("wall", {})
        if os.path.isfile(self.commands_path):
            with open(self.commands_path, encoding="utf-8") as f:
                self.commands = json.load(f)
        if self.setup_seconds is not None:
            self.timings["setup"] = self.setup_seconds
            self._save_timings()

    def _save_timings(self) -> None:
        write_json(self.timings_path, self.timings)

    def _env(self) -> dict:
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if self.compile_cache:
            env.setdefault("JAX_COMPILATION_CACHE_DIR", self.compile_cache)
        if self.recipe.get("xla_flags"):  # quick mode: cheaper XLA compilation (slower code, fine for 2 steps)
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + self.recipe["xla_flags"]).strip()
        return env

    @staticmethod
    def _show(cmd: list[str]) -> str:
        return " ".join(shlex.quote(os.path.relpath(c, os.getcwd()) if os.path.isabs(c) and c.startswith(ROOT)
                                    else c) for c in cmd)

    def _run_job(self, job: "Job", terminal: bool) -> None:
        """Run a job's commands one after the other: on the terminal (progress bars show) or into its log file.
        Sets ``job.error`` instead of raising (jobs run in threads)."""
        for cmd in job.cmds:
            if terminal:
                proc = subprocess.run(cmd.argv, env=self._env())
            else:
                os.makedirs(os.path.dirname(job.log), exist_ok=True)
                with open(job.log, "a", encoding="utf-8") as f:
                    f.write(f"$ {self._show(cmd.argv)}\n")
                    f.flush()
                    proc = subprocess.run(cmd.argv, env=self._env(), stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode not in cmd.ok:
                job.error = f"exit status {proc.returncode}: {self._show(cmd.argv)}"
                return
            if cmd.expect and not os.path.isfile(cmd.expect):
                job.error = f"exit status {proc.returncode} but no {cmd.expect}: {self._show(cmd.argv)}"
                return

    def run_group(self, phases: tuple) -> dict:
        """Plan the phases (each returns its jobs, none when its output exists) and run all their jobs at once:
        the job marked ``terminal`` shows its output live, the others write OUT/work/logs/*.log (a progress bar
        counts them when none is on the terminal). Returns {phase: seconds} of the phases that ran."""
        import threading

        from tqdm import tqdm

        planned = {}
        for ph in phases:
            jobs = getattr(self, ph)()
            if jobs:
                planned[ph] = jobs
                self._fresh_phases.discard(ph)
                self.commands[ph] = [" ".join(shlex.quote(c) for c in cmd.argv) for j in jobs for cmd in j.cmds]
            else:
                self.resumed.add(ph)
                self.log(f"-- {ph}: already done ({_hms(self.timings['phases'].get(ph))} in an earlier run)")
        if not planned:
            return {}
        write_json(self.commands_path, self.commands)
        jobs = [j for js in planned.values() for j in js]
        term = None if self.quiet else next((j for j in jobs if j.terminal), None)
        if len(jobs) == 1 and not self.quiet:
            term = jobs[0]
        for j in jobs:
            if j is not term:
                j.log = os.path.join(self.work, "logs", f"{j.name}.log")
                if os.path.exists(j.log):
                    os.remove(j.log)
        for j in jobs:
            for cmd in j.cmds:
                self.log(f"$ {self._show(cmd.argv)}" + ("" if j is term else f"  > {os.path.relpath(j.log)}"))
        t0 = time.perf_counter()
        cpu0 = _children_cpu()
        load0 = _load()
        bar = None
        if term is None and not self.quiet and len(jobs) > 1:
            bar = tqdm(total=len(jobs), desc=" + ".join(planned), unit="job")
        ends: dict = {}
        lock = threading.Lock()

        def work(j):
            self._run_job(j, j is term)
            with lock:
                ends[j.name] = time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                elif j is not term and not self.quiet:
                    self.log(f"\n-- {j.name} finished ({_hms(ends[j.name])}, log {os.path.relpath(j.log)})")

        threads = [threading.Thread(target=work, args=(j,), daemon=True) for j in jobs if j is not term]
        for t in threads:
            t.start()
        if term is not None:
            work(term)
        for t in threads:
            t.join()
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        failed = [j for j in jobs if j.error]
        if failed:
            msgs = []
            for j in failed:
                tail = ""
                if j.log and os.path.isfile(j.log):
                    with open(j.log, encoding="utf-8", errors="replace") as f:
                        tail = "\n" + f.read()[-3000:]
                msgs.append(f"phase {j.phase}: {j.error}{tail}")
            raise DemoError("\n".join(msgs))
        done = {ph: max(ends[j.name] for j in js) for ph, js in planned.items()}
        for ph, dt in done.items():
            self.timings["phases"][ph] = round(dt, 1)
            self.resumed.discard(ph)
        self.timings["wall"]["+".join(phases)] = round(wall, 1)
        self.timings.setdefault("cpu", {})["+".join(phases)] = round(_children_cpu() - cpu0, 1)
        if load0 is not None:
            self.timings.setdefault("load", {})["+".join(phases)] = round((load0 + (_load() or load0)) / 2, 2)
        self._save_timings()
        return done

    # ---- phases (each returns the jobs to run, [] when its output is already there)

    def corpus(self) -> list:
        if os.path.isfile(os.path.join(self.p["corpus"], "corpus.json")):
            return []
        cmd = [self.py, "-m", "unitok_jax.data.build_corpus", "--out", self.p["corpus"], "--overwrite"]
        if self.recipe["corpus"].get("sentences"):
            cmd += ["--sentences", str(self.recipe["corpus"]["sentences"])]
        if self.recipe["corpus"].get("composed"):
            cmd += ["--composed", str(self.recipe["corpus"]["composed"]), "--composed-readers",
                    str(self.recipe["corpus"].get("composed_readers", 1))]
        if os.path.isdir(self.p["corpus"]) and os.listdir(self.p["corpus"]):
            shutil.rmtree(self.p["corpus"])  # a folder without corpus.json: not finished
        return [Job("corpus", "corpus", [Cmd(cmd)])]

    def edit_corpus(self) -> list:
        """Edit pairs over the corpus's own split: ``--corpus-sentences`` / the default seed make
        build_edit_corpus hold out exactly the sentences build_corpus holds out."""
        if os.path.isfile(os.path.join(self.p["edit_corpus"], "corpus.json")):
            return []
        cmd = [self.py, "-m", "unitok_jax.data.build_edit_corpus", "--out", self.p["edit_corpus"], "--overwrite",
               "--quiet", "--pairs", str(self.recipe["edit"]["pairs"])]
        if self.recipe["corpus"].get("sentences"):
            cmd += ["--corpus-sentences", str(self.recipe["corpus"]["sentences"])]
        return [Job("edit_corpus", "edit_corpus", [Cmd(cmd, expect=os.path.join(self.p["edit_corpus"],
                                                                               "corpus.json"))])]

    def _train(self, phase: str, config: str, overrides: dict, extra: list[str]) -> list:
        workdir = self.p[phase]
        export = os.path.join(workdir, "export", "unitok_config.json")
        if os.path.isfile(export):
            return []
        cmd = [self.py, "-m", "unitok_jax.cli.train", "--config", configs.path(config) + ":tiny", "--workdir",
               workdir, *extra, *config_flags(overrides), "--verbosity=-1"]
        return [Job(phase, phase, [Cmd(cmd, expect=export)])]

    def vae(self) -> list:
        return self._train("vae", "vae", self.recipe["vae"],
                           [f"--config.data.manifest={os.path.join(self.p['corpus'], 'train.jsonl')}"])

    def teacher(self) -> list:
        """Whisper tiny.en encoder features of ``teacher.limit`` training utterances (evenly spaced), projected to
        ``teacher.dim`` channels: the S1 manifest."""
        out = os.path.join(self.p["teacher"], "manifest.jsonl")
        if os.path.isfile(out):
            return []
        t = self.recipe["teacher"]
        cmd = [self.py, "-m", "unitok_jax.data.teacher", "--manifest", os.path.join(self.p["corpus"], "train.jsonl"),
               "--out", self.p["teacher"], "--dim", str(t["dim"]), "--quiet"]
        if t.get("limit"):
            cmd += ["--limit", str(t["limit"])]
        return [Job("teacher", "teacher", [Cmd(cmd, expect=out)])]

    def s1(self) -> list:
        return self._train("s1", "vae", self.recipe["s1"],
                           [f"--config.data.manifest={os.path.join(self.p['teacher'], 'manifest.jsonl')}",
                            f"--config.init.vae={os.path.join(self.p['vae'], 'export')}"])

    def latents(self) -> list:
        """The speech corpus and the training edit pairs (source and target) through the frozen encoder, one
        command after the other."""
        if self.recipe["lm_source"] != "latents":
            return []
        cmds = []
        for corpus, cache in (("corpus", "latents"), ("edit_corpus", "edit_latents")):
            out = os.path.join(self.p[cache], "manifest.jsonl")
            if not os.path.isfile(out):
                cmds.append(Cmd([self.py, "-m", "unitok_jax.data.latent_cache", "--vae",
                                 os.path.join(self.p["vae"], "export"), "--manifest",
                                 os.path.join(self.p[corpus], "train.jsonl"), "--out", self.p[cache]], expect=out))
        return [Job("latents", "latents", cmds)] if cmds else []

    def lm(self) -> list:
        if self.recipe["lm_source"] == "latents":
            data = [f"--config.data.manifest={os.path.join(self.p['latents'], 'manifest.jsonl')}",
                    f"--config.data.edit_manifest={os.path.join(self.p['edit_latents'], 'manifest.jsonl')}",
                    "--config.data.source=latents"]
        else:
            data = [f"--config.data.manifest={os.path.join(self.p['corpus'], 'train.jsonl')}",
                    f"--config.data.edit_manifest={os.path.join(self.p['edit_corpus'], 'train.jsonl')}"]
        return self._train("lm", "lm", self.recipe["lm"],
                           data + [f"--config.init.vae={os.path.join(self.p['s1'], 'export')}"])

    # ---- requests

    def heldout(self) -> list[dict]:
        rows = read_jsonl(os.path.join(self.p["corpus"], "heldout.jsonl"))
        for r in rows:
            r["audio"] = os.path.join(self.p["corpus"], r["audio"])
        return rows

    def heldout_voices(self) -> list[str]:
        with open(os.path.join(self.p["corpus"], "corpus.json"), encoding="utf-8") as f:
            summary = json.load(f)
        return [s["id"] for s in summary["speakers"] if s["heldout"]]

    def write_requests(self) -> dict:
        """sample.py request files and the eval references: reconstruct / asr every held-out utterance; tts each
        held-out sentence in ``sample.tts_voices`` of the held-out voices (taking turns), prompted by that voice
        reading the next held-out sentence (the prompt never says the target's words)."""
        rows = self.heldout()
        req = self.p["requests"]
        paths = {k: os.path.join(req, f"{k}.jsonl") for k in ("reconstruct", "asr", "tts", "tts_reference", "edit")}
        write_jsonl(paths["reconstruct"], [{"id": r["id"], "wav": r["audio"]} for r in rows])
        write_jsonl(paths["asr"], [{"id": r["id"], "wav": r["audio"]} for r in rows])
        voices = self.heldout_voices()
        per_sentence = max(1, min(int(self.recipe["sample"].get("tts_voices") or len(voices)), len(voices)))
        by_voice = {v: sorted((r for r in rows if r["speaker"] == v), key=lambda r: r["id"]) for v in voices}
        texts = sorted({r["text"] for v in voices for r in by_voice[v]})
        tts, refs = [], []
        for i, text in enumerate(texts):
            for j in range(per_sentence):
                voice = voices[(i + j) % len(voices)]
                mine = by_voice[voice]
                k = next((k for k, r in enumerate(mine) if r["text"] == text), None)
                if k is None or len(mine) < 2:
                    continue
                target, prompt = mine[k], mine[(k + 1) % len(mine)]
                rid = f"tts_{target['id']}"
                tts.append({"id": rid, "text": target["text"], "prompt_wav": prompt["audio"],
                            "prompt_text": prompt["text"]})
                refs.append({"id": rid, "audio": target["audio"], "speaker": voice, "text": target["text"],
                             "prompt_wav": prompt["audio"]})
        if not tts:
            raise DemoError(f"no TTS request: the held-out voices {voices} need two held-out sentences each "
                            f"({os.path.join(self.p['corpus'], 'heldout.jsonl')})")
        write_jsonl(paths["tts"], tts)
        write_jsonl(paths["tts_reference"], refs)
        # edit: every held-out pair, its source speech and instruction (semantic edits write the transcript first)
        write_jsonl(paths["edit"], [{"id": r["id"], "wav": r["audio"], "instruction": r["instruction"],
                                     "semantic": r["edit_kind"] == "semantic"} for r in self.edit_heldout()])
        return paths

    def edit_heldout(self) -> list[dict]:
        rows = read_jsonl(os.path.join(self.p["edit_corpus"], "heldout.jsonl"))
        for r in rows:
            for k in ("audio", "target_audio"):
                r[k] = os.path.join(self.p["edit_corpus"], r[k])
        return rows

    def _sample_args(self) -> list[str]:
        return ["--batch-size", str(self.recipe["sample"]["batch_size"])]

    def reconstruct(self) -> list:
        paths = self.write_requests()
        out = os.path.join(self.p["samples"], "reconstruct")
        ids = [r["id"] for r in read_jsonl(paths["reconstruct"])]
        if ids and all(os.path.isfile(os.path.join(out, f"{i}.wav")) for i in ids):
            return []
        return [Job("reconstruct", "reconstruct", [Cmd(
            [self.py, "-m", "unitok_jax.cli.sample", "reconstruct", "--checkpoint",
             os.path.join(self.p["vae"], "export"), "--input", paths["reconstruct"], "--out", out, "--quiet",
             *self._sample_args()])])]

    def _task_done(self, task: str) -> bool:
        req = read_jsonl(os.path.join(self.p["requests"], f"{task}.jsonl"))
        res_path = os.path.join(self.p["samples"], task, "results.jsonl")
        if not os.path.isfile(res_path):
            return False
        done = {r["id"] for r in read_jsonl(res_path)}
        return all(r["id"] in done for r in req)

    def _sample_job(self, task: str, extra: list[str], terminal: bool = False) -> list:
        """``sample.py TASK`` on the LM export over OUT/work/requests/TASK.jsonl, unless every request has a result."""
        if self._task_done(task):
            return []
        return [Job(task, task, [Cmd(
            [self.py, "-m", "unitok_jax.cli.sample", task, "--checkpoint", os.path.join(self.p["lm"], "export"),
             "--input", os.path.join(self.p["requests"], f"{task}.jsonl"), "--out",
             os.path.join(self.p["samples"], task), *extra, *self._sample_args()])], terminal=terminal)]

    def asr(self) -> list:
        return self._sample_job("asr", ["--max-new-tokens", str(self.recipe["sample"]["max_new_tokens"])])

    def tts(self) -> list:
        s = self.recipe["sample"]
        extra = ["--steps", str(s["steps"]), "--cfg", str(s["cfg"])]
        if s.get("max_patches"):
            extra += ["--max-patches", str(s["max_patches"])]
        return self._sample_job("tts", extra, terminal=True)

    def edit(self) -> list:
        s = self.recipe["sample"]
        return self._sample_job("edit", ["--steps", str(s["steps"]), "--cfg", str(s["cfg"]), "--max-patches",
                                         str(s["edit_max_patches"]), "--max-new-tokens", str(s["max_new_tokens"])])

    def _asr_results_for_eval(self) -> str:
        """sample.py writes ``"language": null`` when the model emits no language tag, which the evaluator
        rejects as a bad line (the item would count as failed instead of being scored): score a copy with the
        language dropped where it is not a string."""
        rows = read_jsonl(os.path.join(self.p["samples"], "asr", "results.jsonl"))
        for r in rows:
            if not isinstance(r.get("language"), str):
                r.pop("language", None)
        path = os.path.join(self.p["samples"], "asr", "results.eval.jsonl")
        write_jsonl(path, rows)
        return path

    def eval(self) -> list:
        os.makedirs(self.p["eval"], exist_ok=True)
        req, smp, ev = self.p["requests"], self.p["samples"], self.p["eval"]
        jobs = []
        for name in ("vae", "asr", "tts", "edit"):
            path = os.path.join(ev, f"{name}.json")
            if os.path.isfile(path):
                continue
            if name == "vae":
                # the held-out manifest: the requests' audio, with the texts the judge needs
                args = ["vae", "--reference", os.path.join(self.p["corpus"], "heldout.jsonl"), "--generated",
                        os.path.join(smp, "reconstruct")]
            elif name == "asr":
                args = ["asr", "--results", self._asr_results_for_eval(), "--manifest",
                        os.path.join(self.p["corpus"], "heldout.jsonl"), "--requests", os.path.join(req, "asr.jsonl")]
            elif name == "tts":
                args = ["tts", "--results", os.path.join(smp, "tts"), "--reference",
                        os.path.join(req, "tts_reference.jsonl"), "--requests", os.path.join(req, "tts.jsonl")]
            else:
                args = ["edit", "--results", os.path.join(smp, "edit"), "--manifest",
                        os.path.join(self.p["edit_corpus"], "heldout.jsonl"), "--requests",
                        os.path.join(req, "edit.jsonl")]
            # exit status 1 = some items failed: they are listed in the JSON report, which still has the means
            jobs.append(Job("eval", f"eval-{name}", [Cmd([self.py, "-m", "unitok_jax.eval", *args, "--json", path],
                                                          ok=(0, 1), expect=path)]))
        return jobs

    # ---- report

    def _load_eval(self, name: str) -> dict:
        with open(os.path.join(self.p["eval"], f"{name}.json"), encoding="utf-8") as f:
            return json.load(f)

    def report(self) -> list:
        from unitok_jax.audio import load_audio
        from unitok_jax.eval import metrics as M

        ev = {k: self._load_eval(k) for k in ("vae", "asr", "tts", "edit")}
        # mel comparisons: the TTS item with the median MCD (a typical one, not the best), and the reconstruction
        # of the same target utterance
        tts_rows = [r for r in ev["tts"]["rows"] if r.get("mcd") is not None]
        if not tts_rows:
            raise DemoError("no TTS item was scored; see OUT/eval/tts.json")
        tts_rows.sort(key=lambda r: r["mcd"])
        pick = tts_rows[len(tts_rows) // 2]
        gen_w, ref_w = load_audio(pick["generated"], 16000), load_audio(pick["reference"], 16000)
        M.plot_mel_comparison(gen_w, ref_w, os.path.join(self.out, "mel_tts.png"),
                              title=f"TTS {pick['id']} (held-out voice, median MCD {pick['mcd']:.2f} dB)")
        target_id = pick["id"][len("tts_"):]
        rec_rows = {r["id"]: r for r in ev["vae"]["rows"] if "error" not in r}
        if not rec_rows:
            raise DemoError("no VAE reconstruction was scored; see OUT/eval/vae.json")
        rec_pick = rec_rows.get(target_id) or next(iter(rec_rows.values()))
        M.plot_mel_comparison(load_audio(rec_pick["generated"], 16000), load_audio(rec_pick["reference"], 16000),
                              os.path.join(self.out, "mel_reconstruction.png"),
                              labels=("VAE reconstruction", "original"),
                              title=f"VAE reconstruction of held-out {rec_pick['id']} (STOI "
                                    f"{rec_pick.get('stoi') or float('nan'):.3f})")
        examples = self._copy_examples(ev, pick)
        text = self._report_text(ev, pick, rec_pick, examples)
        write_text(os.path.join(self.out, "report.md"), text)
        return []

    def _copy_examples(self, ev: dict, pick: dict) -> list[dict]:
        """A few TTS outputs with their prompt and reference, and reconstructions with their originals."""
        wavs = os.path.join(self.out, "wavs")
        shutil.rmtree(wavs, ignore_errors=True)
        os.makedirs(wavs)
        n = int(self.recipe["examples"])
        reqs = {r["id"]: r for r in read_jsonl(os.path.join(self.p["requests"], "tts.jsonl"))}
        rows = [r for r in ev["tts"]["rows"] if "error" not in r]
        chosen = [pick] + [r for r in rows if r["id"] != pick["id"]][: max(n - 1, 0)]
        out = []
        for r in chosen:
            rid = r["id"]
            files = {"generated": f"{rid}.generated.wav", "reference": f"{rid}.reference.wav",
                     "prompt": f"{rid}.prompt.wav"}
            shutil.copyfile(r["generated"], os.path.join(wavs, files["generated"]))
            shutil.copyfile(r["reference"], os.path.join(wavs, files["reference"]))
            shutil.copyfile(reqs[rid]["prompt_wav"], os.path.join(wavs, files["prompt"]))
            out.append({"id": rid, "text": reqs[rid]["text"], "prompt_text": reqs[rid]["prompt_text"],
                        "mcd": r.get("mcd"), "baseline_mcd": r.get("baseline_mcd"), **files})
        for r in [r for r in ev["vae"]["rows"] if "error" not in r][:n]:
            shutil.copyfile(r["generated"], os.path.join(wavs, f"{r['id']}.reconstruction.wav"))
            shutil.copyfile(r["reference"], os.path.join(wavs, f"{r['id']}.original.wav"))
        return out

    def _report_text(self, ev: dict, pick: dict, rec_pick: dict, examples: list[dict]) -> str:
        with open(os.path.join(self.p["corpus"], "corpus.json"), encoding="utf-8") as f:
            corpus = json.load(f)
        vm, tm = ev["vae"]["mean"], ev["tts"]["mean"]
        ac = ev["asr"]["corpus"]
        mach = machine()
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

        def f(v, spec=".3f"):
            return "-" if v is None else format(v, spec)

        def verdict(ok: Optional[bool]) -> str:
            return "-" if ok is None else ("met" if ok else "not met")

        def ok(v, target, below=True):
            return None if v is None or target is None else (v <= target if below else v >= target)

        def within(j, factor):  # the judge's WER at most factor x its WER on the references
            return None if j["wer"] is None or j["floor_wer"] is None else j["wer"] <= factor * j["floor_wer"]

        stoi_ok = ok(vm.get("stoi"), TARGETS["stoi"], below=False)
        cer_ok = ok(ac.get("cer"), TARGETS["cer"])
        mcd_ok = None if tm.get("mcd") is None or tm.get("baseline_mcd") is None else tm["mcd"] < tm["baseline_mcd"]
        em = ev["edit"]["mean"]
        edit_ok = None if em.get("mcd") is None or em.get("baseline_mcd") is None else em["mcd"] < em["baseline_mcd"]
        from unitok_jax.eval.metrics import edit_summary

        ex = edit_summary("all", ev["edit"])  # the CoT rates cover the semantic pairs, moved_right the acoustic ones
        heldout = corpus["splits"]["heldout"]
        train = corpus["splits"]["train"]
        voices = self.heldout_voices()
        vj, tj = judge_summary(ev["vae"]), judge_summary(ev["tts"])
        lines = [
            f"# unitok_jax demo{' (quick mode: a smoke test, not a result)' if self.recipe['mode'] == 'quick' else ''}",
            "",
            f"Tiny models trained from scratch on CPU on an eSpeak NG corpus built on the spot, then evaluated on "
            f"held-out sentences and held-out voices. Run finished {now} on {mach.get('host')} "
            f"({mach.get('cpu')}, {mach.get('cores')} cores, {mach.get('memory_gib')} GiB; "
            f"{mach.get('device', 'cpu')}; JAX {mach.get('jax', '?')}, Python {mach.get('python')}).",
            "",
            "## Results",
            "",
            f"Judge: {vj['model']}, offline: an ASR model independent of ours transcribes the generated speech and "
            "the eSpeak originals of the same held-out sentences; its error rates on the originals are the floor "
            "(what a perfect system would score with this judge). Rates are corpus rates (errors / reference words "
            "or characters).",
            "",
            "| what | metric | value | floor / baseline | target |",
            "|---|---|---|---|---|",
            f"| VAE reconstruction ({ev['vae']['scored']} held-out utterances) | STOI | {f(vm.get('stoi'))} | "
            f"1 (the original) | >= {TARGETS['stoi']} ({verdict(stoi_ok)}) |",
            f"| | judge WER on reconstructions | {f(vj['wer'], '.2%')} | {f(vj['floor_wer'], '.2%')} on the "
            f"originals | <= {TARGETS['vae_judge_ratio']}x the originals' "
            f"({f(vj['ratio'], '.2f')}x: {verdict(within(vj, TARGETS['vae_judge_ratio']))}) |",
            f"| | judge CER on reconstructions | {f(vj['cer'], '.2%')} | {f(vj['floor_cer'], '.2%')} | |",
            f"| | PESQ-WB | {f(vm.get('pesq'))} | 4.64 | |",
            f"| | log-mel L1 | {f(vm.get('log_mel_l1'))} | 0 | |",
            f"| | SI-SDR (dB) | {f(vm.get('si_sdr'), '.2f')} | | |",
            f"| ASR, our model ({ev['asr']['scored']} held-out utterances) | CER (corpus) | "
            f"{f(ac.get('cer'), '.2%')} | judge on the same audio: {f(vj['floor_cer'], '.2%')} | "
            f"<= {TARGETS['cer']:.0%} ({verdict(cer_ok)}) |",
            f"| | WER (corpus) | {f(ac.get('wer'), '.2%')} | judge: {f(vj['floor_wer'], '.2%')} | |",
            f"| TTS ({ev['tts']['scored']} held-out sentences, each in a held-out voice: {', '.join(voices)}) | "
            f"judge WER on the generated speech | {f(tj['wer'], '.2%')} | {f(tj['floor_wer'], '.2%')} on the "
            f"eSpeak renderings | <= {TARGETS['tts_judge_ratio']}x the renderings' "
            f"({f(tj['ratio'], '.2f')}x: {verdict(within(tj, TARGETS['tts_judge_ratio']))}) |",
            f"| | judge CER on the generated speech | {f(tj['cer'], '.2%')} | {f(tj['floor_cer'], '.2%')} | |",
            f"| | speaker proxy: prompt voice ranked first | {f(tm.get('speaker_top1'), '.2f')} | "
            f"{1 / max(len(voices), 1):.2f} by chance | >= {TARGETS['speaker_top1']} "
            f"({verdict(ok(tm.get('speaker_top1'), TARGETS['speaker_top1'], below=False))}) |",
            f"| | MCD-DTW (dB) | {f(tm.get('mcd'), '.2f')} | copy-the-prompt: {f(tm.get('baseline_mcd'), '.2f')} | "
            f"below the copy-the-prompt baseline ({verdict(mcd_ok)}) |",
            f"| | duration relative error | {f(tm.get('duration_rel_error'))} | | |",
            f"| | speaker proxy: similarity to prompt voice / to the other voice | "
            f"{f(tm.get('speaker_similarity_prompt'))} / {f(tm.get('speaker_similarity_others'))} | | |",
            f"| Edit ({ev['edit']['scored']} held-out pairs, 10 edit types) | CoT CER, semantic edits (corpus) | "
            f"{f(ex['cot_cer'], '.2%')} | | <= {TARGETS['cot_cer']:.0%} "
            f"({verdict(ok(ex['cot_cer'], TARGETS['cot_cer']))}) |",
            f"| | MCD-DTW to the intended target (dB) | {f(em.get('mcd'), '.2f')} | do-nothing (the source against "
            f"the target): {f(em.get('baseline_mcd'), '.2f')} | below the do-nothing baseline ({verdict(edit_ok)}) |",
            f"| | acoustic edits: measured property moved the right way | {f(ex['moved_right'], '.2f')} | | |",
            "",
            "Metric definitions: `unitok_jax/eval/metrics.py`. MCD-DTW compares the generated speech with the same "
            "sentence rendered by eSpeak in the prompt's voice; the copy-the-prompt baseline scores the prompt "
            "itself (right voice, wrong words) against that reference. Edits: the CoT CER compares the model's "
            "`<cot_text>` with the intended transcript (its `<edit>` span counted as one word); MCD-DTW compares the "
            "edited speech with eSpeak's rendering of the intended result, next to the source itself (an edit that "
            "does nothing). Per-item numbers: `eval/vae.json`, `eval/asr.json`, `eval/tts.json`, `eval/edit.json`.",
            "",
            "![TTS mel spectrograms](mel_tts.png)",
            "",
            f"`mel_tts.png`: TTS of \"{next((e['text'] for e in examples if e['id'] == pick['id']), '')}\" "
            f"(item `{pick['id']}`, the median MCD, {pick['mcd']:.2f} dB) next to the reference rendering.",
            "",
            "![VAE reconstruction mel spectrograms](mel_reconstruction.png)",
            "",
            f"`mel_reconstruction.png`: the VAE's reconstruction of `{rec_pick['id']}` next to the original.",
            "",
            "### ASR examples",
            "",
            "| id | reference | transcript | CER |",
            "|---|---|---|---|",
        ]
        asr_res = {r["id"]: r for r in read_jsonl(os.path.join(self.p["samples"], "asr", "results.jsonl"))}
        refs = {r["id"]: r for r in self.heldout()}
        for r in [r for r in ev["asr"]["rows"] if "error" not in r][: 2 * int(self.recipe["examples"])]:
            hyp = _md_cell(asr_res.get(r["id"], {}).get("text", ""))
            lines.append(f"| {r['id']} | {refs[r['id']]['text']} | {hyp} | {f(r.get('cer'), '.2%')} |")
        lines += ["", "### Example audio (`wavs/`)", "",
                  "| TTS item | text | prompt (other sentence, same voice) | generated | reference | MCD / copy |",
                  "|---|---|---|---|---|---|"]
        for e in examples:
            lines.append(f"| {e['id']} | {e['text']} | [{e['prompt']}](wavs/{e['prompt']}) | "
                         f"[{e['generated']}](wavs/{e['generated']}) | [{e['reference']}](wavs/{e['reference']}) | "
                         f"{f(e['mcd'], '.2f')} / {f(e['baseline_mcd'], '.2f')} |")
        lines += ["", "VAE reconstructions: `wavs/<id>.reconstruction.wav` next to `wavs/<id>.original.wav`.", ""]
        lines += self._edit_section(ev["edit"], f)

        # timings
        cpu, load = self.timings.get("cpu", {}), self.timings.get("load", {})
        lines += ["## Timings", "", "| phase | wall time | CPU time | load average |", "|---|---|---|---|"]
        if self.timings.get("setup") is not None:
            lines.append(f"| setup | {_hms(self.timings['setup'])} | | |")
        for group in GROUPS[:-1]:
            key = "+".join(group)
            for i, ph in enumerate(group):
                if ph in self.timings["phases"]:
                    note = " (earlier run)" if ph in self.resumed else ""
                    if len(group) > 1:
                        note += " (concurrently with " + ", ".join(g for g in group if g != ph) + ")"
                    c = _hms(cpu.get(key)) if i == 0 else "(above)"
                    ld = (f"{load[key]:.1f}" if key in load else "-") if i == 0 else ""
                    lines.append(f"| {ph} | {_hms(self.timings['phases'][ph])}{note} | {c} | {ld} |")
        total_cpu = sum(cpu.values()) if cpu else None
        lines += [f"| **total** | **{_hms(self.total_seconds())}** | {_hms(total_cpu)} | |", "",
                  "`setup` is `make`'s virtualenv step (only through `make demo`); the total adds the wall time of "
                  "each group of phases (concurrent phases count once) and leaves out writing this report (a few "
                  "seconds). CPU time: user + system seconds of the group's commands (concurrent phases share one "
                  f"figure). Load average: the 1-minute load while the group ran (this machine has {mach.get('cores')} "
                  "cores; a load well above that, or a wall time well above CPU time / cores, means the machine was "
                  "shared with other work and the wall times are inflated). \"Earlier run\": done by an earlier "
                  "invocation that this one resumed. The XLA compilation cache (`--compile-cache`) was "
                  + (f"`{self.compile_cache}`" if self.compile_cache else "off")
                  + "; a warm cache saves most of the compile time on a second run."
                  + (f" XLA_FLAGS added: `{self.recipe['xla_flags']}`." if self.recipe.get("xla_flags") else ""), ""]

        # recipe
        tpath = os.path.join(self.p["teacher"], "teacher.json")
        teacher_note = "-"
        if os.path.isfile(tpath):
            with open(tpath, encoding="utf-8") as fh:
                tsum = json.load(fh)
            teacher_note = (f"{tsum['records']} utterances, {tsum['frames']} frames at 50 Hz; the projection keeps "
                            f"{tsum['explained']:.1%} of the variance")
        composed = corpus.get("parameters", {}).get("composed") or 0
        lines += ["## Recipe", "",
                  f"Corpus: `python -m unitok_jax.data.build_corpus` -- eSpeak NG {corpus.get('espeak_version')}, "
                  f"{corpus['total']['utterances']} utterances, {corpus['total']['hours']:.2f} h, "
                  f"{len(corpus['total']['speakers'])} voices; train {train['utterances']} utterances "
                  f"({train['sentences']} sentences, {len(train['speakers'])} voices); held out "
                  f"{heldout['utterances']} utterances ({heldout['sentences']} sentences never seen in training, "
                  f"each read by one training voice and by the held-out voices {', '.join(voices)}). "
                  f"{composed} of the training sentences are composed from templates and word lists "
                  "(`unitok_jax.data.compose`); the held-out ones are all handwritten (`sentences.txt`).", "",
                  "Models: `configs/vae.py:tiny` and `configs/lm.py:tiny` with these overrides:", "",
                  "| stage | overrides |", "|---|---|",
                  f"| VAE (S0) | {', '.join(f'`{k}={_fmt_override(v)}`' for k, v in self.recipe['vae'].items())} |",
                  f"| teacher | Whisper tiny.en encoder, {self.recipe['teacher'].get('limit') or 'all'} training "
                  f"utterances, PCA to {self.recipe['teacher']['dim']} channels ({teacher_note}) |",
                  f"| S1 | {', '.join(f'`{k}={_fmt_override(v)}`' for k, v in self.recipe['s1'].items())} |",
                  f"| LM | {', '.join(f'`{k}={_fmt_override(v)}`' for k, v in self.recipe['lm'].items())}, "
                  f"`data.source={self.recipe['lm_source']}` |",
                  f"| sampling | {', '.join(f'`{k}={v}`' for k, v in self.recipe['sample'].items())} |", "",
                  "Commands (as run; the demo skips a phase whose output exists):", "", "```"]
        for ph in PHASES:
            for c in self.commands.get(ph, []):
                lines.append(c.replace(ROOT + os.sep, "").replace(self.out + os.sep, os.path.basename(self.out) +
                                                                   os.sep))
        lines += ["```", ""]
        train_log = self._final_metrics()
        if train_log:
            lines += ["Final training metrics:", "", "```"] + train_log + ["```", ""]
        return "\n".join(lines)

    def _edit_section(self, rep: dict, f) -> list[str]:
        """Per edit type: the CoT rates (semantic), MCD to the target next to the do-nothing MCD, the fraction
        moved the right way (acoustic); then a few held-out pairs with the model's CoT and the audio."""
        from unitok_jax.eval import metrics as M

        lines = ["## Editing", "",
                 f"Every held-out pair of the edit corpus ({rep['count']} pairs over held-out sentences; half of them "
                 "with a held-out voice as the source), edited by `sample.py edit` from its source speech and "
                 "instruction.", "",
                 "| edit type | pairs scored | no audio | CoT CER | CoT exact | MCD to target (dB) | "
                 "do-nothing MCD (dB) | property | moved the right way | progress |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        props = {}
        for r in rep["rows"]:
            if r.get("property"):
                props[r["edit_type"]] = r["property"]
        for name, t in list(rep["by_type"].items()) + [("all", rep)]:
            x = M.edit_summary(name, t)
            lines.append(f"| {name} | {x['scored']}/{x['pairs']} | {x['no_audio']} | {f(x['cot_cer'], '.2%')} | "
                         f"{f(x['cot_exact'], '.2f')} | {f(x['mcd'], '.2f')} | {f(x['baseline_mcd'], '.2f')} | "
                         f"{props.get(name, '-')} | {f(x['moved_right'], '.2f')} | {f(x['progress'], '.2f')} |")
        lines += ["", "No audio: the model ended without `<gen_audio>` (or with no patch), which counts as \"did not "
                  "move\". Progress: how far the measured property went from the source's value towards the target's "
                  "(1 = all the way, 0 = not at all, negative = the wrong way); the speaker edit compares the "
                  "speaker proxy's similarity to the target voice and to the source voice.", ""]
        # examples: one pair per edit type, the CoT and the audio
        res = {r["id"]: r for r in read_jsonl(os.path.join(self.p["samples"], "edit", "results.jsonl"))}
        pairs = {r["id"]: r for r in self.edit_heldout()}
        wavs = os.path.join(self.out, "wavs")
        lines += ["| pair | instruction | intended | model's `<cot_text>` | source | edited | target |",
                  "|---|---|---|---|---|---|---|"]
        seen = set()
        for r in rep["rows"]:
            if "error" in r or r["edit_type"] in seen or r["id"] not in res:
                continue
            seen.add(r["edit_type"])
            pair, rid = pairs[r["id"]], r["id"]
            names = {k: f"{rid}.{k}.wav" for k in ("source", "edited", "target")}
            for k, src in (("source", pair["audio"]), ("edited", r["edited"]), ("target", pair["target_audio"])):
                shutil.copyfile(src, os.path.join(wavs, names[k]))
            cot = res[rid].get("target_markup")
            cells = {k: f"[{k}](wavs/{names[k]})" for k in names}
            if not r.get("has_audio"):
                cells["edited"] = "(no audio)"
            lines.append(f"| {rid} | {_md_cell(pair['instruction'])} | {_md_cell(pair.get('target_markup') or '-')} | "
                         f"{'-' if cot is None else _md_cell(cot)} | "
                         + " | ".join(cells[k] for k in ("source", "edited", "target")) + " |")
        return lines + [""]

    def _final_metrics(self) -> list[str]:
        out = []
        for stage, keys in (("vae", ("mel", "kl", "loss_g", "loss_d")), ("s1", ("loss", "distill_cos")),
                            ("lm", ("text_ce", "text_acc", "flow", "stop"))):
            path = os.path.join(self.p[stage], "metrics.jsonl")
            if not os.path.isfile(path):
                continue
            rows = [r for r in read_jsonl(path) if "step" in r]
            if rows:
                last = rows[-1]
                out.append(f"{stage} step {last['step']}: " + ", ".join(
                    f"{k}={last[k]:.4f}" for k in keys if isinstance(last.get(k), (int, float))))
        return out

    # ---- driver

    TITLES = {
        "corpus": "build the eSpeak corpus", "vae": "train the VAE (S0)", "latents": "cache the VAE latents",
        "teacher": "Whisper tiny.en teacher features", "s1": "distil the teacher into the semantic path (S1)",
        "lm": "train the LM + flow head", "reconstruct": "VAE reconstruction of the held-out audio",
        "asr": "ASR of the held-out audio", "tts": "TTS of the held-out sentences in the held-out voices",
        "eval": "evaluate", "report": "write the report", "edit_corpus": "build the edit corpus",
        "edit": "edit the held-out edit pairs' source speech",
    }

    def main(self) -> int:
        t_start = time.perf_counter()
        for i, group in enumerate(GROUPS):
            self.log(f"\n== [{i + 1}/{len(GROUPS)}] " + "; ".join(self.TITLES[ph] for ph in group)
                     + (" (concurrently)" if len(group) > 1 else "") + " ==")
            if group == ("report",):
                t0 = time.perf_counter()
                self.report()
                self.log(f"-- report: {_hms(time.perf_counter() - t0)}")
                continue
            for ph, dt in self.run_group(group).items():
                self.log(f"-- {ph}: {_hms(dt)}")
        wall = time.perf_counter() - t_start
        self.log(f"\ndemo finished in {_hms(wall)} (this invocation); all phases, earlier runs included: "
                 f"{_hms(self.total_seconds())}. Report: {os.path.join(self.out, 'report.md')}")
        return 0

    def total_seconds(self) -> float:
        return float(self.timings.get("setup") or 0.0) + sum(self.timings["wall"].values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unitok_jax.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo", help="output folder (default: demo)")
    ap.add_argument("--quick", action="store_true", help="a few utterances and steps: the end-to-end smoke test")
    ap.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE",
                    help="override the recipe: vae.train.steps=800, lm.train.lr=0.002, sample.steps=16, ...")
    ap.add_argument("--fresh", action="store_true", help="delete OUT/work and start over")
    ap.add_argument("--quiet", action="store_true", help="hide the commands' own output (shown on failure)")
    ap.add_argument("--compile-cache", default=default_compile_cache(), metavar="DIR",
                    help="JAX persistent compilation cache shared by the phases and by later runs (default: "
                         "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/unitok_jax/jax); 'none' turns it off")
    ap.add_argument("--setup-seconds", type=float, default=None, help=argparse.SUPPRESS)  # from make demo
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        recipe = build_recipe(args.quick, args.set)
        cache = None if args.compile_cache in ("", "none") else os.path.abspath(os.path.expanduser(args.compile_cache))
        demo = Demo(args.out, recipe, quiet=args.quiet, setup_seconds=args.setup_seconds, compile_cache=cache)
        demo.prepare(args.fresh)
        return demo.main()
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        print(f"(after {_hms(time.perf_counter() - t0)}; re-run the same command to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
