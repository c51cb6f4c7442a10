"""``make demo`` end to end at the smoke-test size, as a user who installed the package runs it: a wheel built from
the sources, installed into a fresh virtualenv (its dependencies borrowed from this interpreter's site-packages, so
nothing is downloaded), and ``unitok-demo --quick`` run from a folder outside the checkout (issue 19: the package
stands alone): corpus -> VAE + Whisper teacher -> S1 + latent cache -> LM -> reconstruct / ASR / TTS / edit -> eval
(with the Whisper judge) -> report, then a resumed run that redoes nothing and a refused recipe change. Also: the
wheel carries the packaged configs, the CLIs and the console scripts; no installed module imports the repository's
``configs`` or runs a root script by path; ``unitok-train --config configs/vae.py:tiny`` resolves the packaged config
from a folder that has none."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time

import pytest
import soundfile as sf

from conftest import REPO
from unitok_jax import demo

ENV = {k: v for k, v in dict(os.environ, JAX_PLATFORMS="cpu").items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(venv python, venv bin folder, a folder outside the checkout) with the wheel installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "unitok_jax", src / "unitok_jax", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the build backend is a test dependency (setuptools + wheel in the `test` extra): no isolated build env, so no
    # package index is needed here
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("unitok_jax-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies: this interpreter's site-packages appended to the new one's path (a .pth line adds a folder
    # without running the .pth files in it, so this checkout's editable install stays out)
    ours = [p for p in dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]) if os.path.isdir(p)]
    with open(os.path.join(purelib, "zz_borrowed_dependencies.pth"), "w") as f:
        f.write("\n".join(ours) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outside = tmp / "elsewhere"
    outside.mkdir()
    return py, env_dir / "bin", outside, wheel


def _run(venv, *args, timeout=1800):
    """The installed ``unitok-demo`` in the folder outside the checkout."""
    _, bin_dir, outside, _ = venv
    return subprocess.run([str(bin_dir / "unitok-demo"), *args], cwd=outside, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def quick_demo(venv):
    """The quick demo run by the installed ``unitok-demo`` from a folder outside the checkout."""
    _, bin_dir, outside, _ = venv
    out = outside / "demo"
    t0 = time.perf_counter()
    # a compilation cache of its own: the test neither reads nor fills the user's
    proc = _run(venv, "--out", str(out), "--quick", "--quiet", "--compile-cache", str(outside / "jax_cache"))
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert not (outside / "configs").exists() and not (outside / "sample.py").exists()
    return out, proc, wall


def test_wheel_holds_configs_cli_and_console_scripts(venv):
    import zipfile

    _, bin_dir, _, wheel = venv
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("unitok_jax/configs/vae.py", "unitok_jax/configs/lm.py", "unitok_jax/configs/llm.py",
              "unitok_jax/cli/train.py", "unitok_jax/cli/sample.py", "unitok_jax/io.py", "unitok_jax/data/sentences.txt"):
        assert f in names
    assert not [n for n in names if n.startswith(("configs/", "tests/", "bench/")) or n in ("train.py", "sample.py")]
    for script in ("unitok-train", "unitok-sample", "unitok-demo", "unitok-convert", "unitok-eval", "unitok-export"):
        assert (bin_dir / script).is_file(), script


def test_installed_package_never_imports_the_repository(venv):
    py, _, outside, _ = venv
    code = ("import os, sys, unitok_jax; print(os.path.dirname(unitok_jax.__file__)); "
            "import unitok_jax.cli.train, unitok_jax.cli.sample, unitok_jax.demo, unitok_jax.training.lm_train, "
            "unitok_jax.training.vae_train; print('configs' in sys.modules)")
    proc = subprocess.run([str(py), "-c", code], cwd=outside, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg, imported = proc.stdout.split()
    assert not pkg.startswith(str(REPO)) and imported == "False"
    bad = []  # function-level imports too: the sources of the installed package, line by line
    for root, _, files in os.walk(pkg):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if re.match(r"\s*(from configs\b|import configs\b)|.*[\"'](train|sample)\.py[\"']\s*\)", line):
                            bad.append(f"{os.path.relpath(path, pkg)}:{i}: {line.strip()}")
    assert not bad, bad


def test_packaged_configs_resolve_outside_the_checkout(venv):
    """``--config configs/vae.py:tiny`` names the packaged config from a folder that has no ``configs/`` (the demo's
    training phases, run by the quick demo below, use the packaged files too); a name that is neither a file nor a
    packaged config is left to the flag parser, whose error names it."""
    py, bin_dir, outside, _ = venv
    assert not (outside / "configs").exists() and not (outside / "train.py").exists()
    code = ("from unitok_jax import configs; print(configs.resolve('configs/vae.py:tiny')); "
            "print(configs.resolve('configs/nope.py:tiny'))")
    proc = subprocess.run([str(py), "-c", code], cwd=outside, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good, bad = proc.stdout.split()
    assert good.endswith(os.path.join("unitok_jax", "configs", "vae.py") + ":tiny") and os.path.isfile(good[:-5])
    assert bad == "configs/nope.py:tiny"
    proc = subprocess.run([str(bin_dir / "unitok-train"), "--config", "configs/nope.py:tiny", "--workdir", "x"],
                          cwd=outside, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nope.py" in proc.stderr


def test_quick_demo_writes_report_plots_and_eval_json(quick_demo):
    out, proc, wall = quick_demo
    # eval JSON reports with finite means for every task
    expected = {"vae": ("stoi", "pesq", "log_mel_l1", "si_sdr"), "asr": ("wer", "cer"),
                "tts": ("mcd", "baseline_mcd", "duration_rel_error")}
    reports = {}
    for task, keys in expected.items():
        with open(out / "eval" / f"{task}.json", encoding="utf-8") as f:
            rep = json.load(f)
        reports[task] = rep
        assert rep["task"] == task
        assert rep["scored"] == rep["count"] > 0, rep.get("failed")
        for k in keys:
            assert _finite(rep["mean"][k]), (task, k, rep["mean"])
    assert _finite(reports["asr"]["corpus"]["cer"])
    # every held-out utterance was reconstructed and transcribed; TTS: each held-out sentence x held-out voice
    with open(out / "work" / "corpus" / "heldout.jsonl", encoding="utf-8") as f:
        heldout = [json.loads(line) for line in f if line.strip()]
    assert reports["vae"]["count"] == reports["asr"]["count"] == len(heldout)
    with open(out / "work" / "corpus" / "corpus.json", encoding="utf-8") as f:
        voices = {s["id"] for s in json.load(f)["speakers"] if s["heldout"]}
    assert len(voices) == 2
    # TTS: every held-out sentence once, in a held-out voice, prompted by that voice saying something else
    sentences = {r["text"] for r in heldout if r["speaker"] in voices}
    assert reports["tts"]["count"] == len(sentences) >= 2
    with open(out / "work" / "requests" / "tts.jsonl", encoding="utf-8") as f:
        requests = [json.loads(line) for line in f if line.strip()]
    assert {r["text"] for r in requests} == sentences
    by_audio = {os.path.basename(r["audio"]): r for r in heldout}
    for r in requests:
        prompt = by_audio[os.path.basename(r["prompt_wav"])]
        assert prompt["speaker"] in voices and r["id"].startswith(f"tts_{prompt['speaker']}_")
        assert prompt["text"] == r["prompt_text"] != r["text"]

    # the report carries the same numbers, the recipe and the timings
    text = (out / "report.md").read_text(encoding="utf-8")
    stoi = re.search(r"\| STOI \| ([0-9.]+) \|", text)
    assert stoi and abs(float(stoi.group(1)) - reports["vae"]["mean"]["stoi"]) < 1e-3
    cer = re.search(r"\| CER \(corpus\) \| ([0-9.]+)% \|", text)
    assert cer and abs(float(cer.group(1)) / 100 - reports["asr"]["corpus"]["cer"]) < 1e-4
    mcd = re.search(r"\| MCD-DTW \(dB\) \| ([0-9.]+) \|", text)
    assert mcd and abs(float(mcd.group(1)) - reports["tts"]["mean"]["mcd"]) < 0.01
    for phase in demo.PHASES[:-1]:
        assert re.search(rf"^\| {phase} \| \d+:\d\d[ |]", text, re.M), phase
    assert re.search(r"\*\*total\*\* \| \*\*\d+:\d\d\*\*", text)
    assert "--config.train.steps=" in text and "unitok_jax.cli.sample tts" in text
    # the judge: its rates on the generated speech beside its rates on the eSpeak originals, in the eval JSON and
    # in the report
    for task in ("vae", "tts"):
        j = reports[task]["judge"]
        assert j["items"] == reports[task]["scored"] and "Whisper tiny.en" in j["model"]
        assert _finite(j["generated"]["wer"]) and _finite(j["reference"]["wer"])
        assert j["reference"]["wer"] <= 0.5  # eSpeak speech is intelligible to the judge
    row = re.search(r"\| judge WER on the generated speech \| ([0-9.]+)% \| ([0-9.]+)% on the eSpeak", text)
    assert row and abs(float(row.group(1)) / 100 - reports["tts"]["judge"]["generated"]["wer"]) < 1e-4
    assert abs(float(row.group(2)) / 100 - reports["tts"]["judge"]["reference"]["wer"]) < 1e-4
    row = re.search(r"\| judge WER on reconstructions \| ([0-9.]+)% \| ([0-9.]+)% on the originals", text)
    assert row and abs(float(row.group(1)) / 100 - reports["vae"]["judge"]["generated"]["wer"]) < 1e-4
    assert "mel_tts.png" in text and "mel_reconstruction.png" in text

    # PNGs (real images, not empty files) and the example wavs the report links
    for png in ("mel_tts.png", "mel_reconstruction.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    for link in re.findall(r"\]\((wavs/[^)]+\.wav)\)", text):
        assert (out / link).stat().st_size > 1000, link
    assert "finished" in proc.stdout and "demo finished in" in proc.stdout


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_quick_demo_trains_on_edit_pairs_and_evaluates_every_heldout_pair(quick_demo):
    out, _, _ = quick_demo
    work = out / "work"
    # the edit corpus holds out exactly the speech corpus's held-out sentences
    speech_heldout = {r["text"] for r in _jsonl(work / "corpus" / "heldout.jsonl")}
    speech_train = {r["text"] for r in _jsonl(work / "corpus" / "train.jsonl")}
    edit_train, edit_heldout = _jsonl(work / "edit_corpus" / "train.jsonl"), _jsonl(work / "edit_corpus" /
                                                                                     "heldout.jsonl")
    assert edit_heldout and {r["text"] for r in edit_heldout} <= speech_heldout
    assert {r["text"] for r in edit_train} <= speech_train
    # the training pairs were cached (source and target) and the LM ran an edit step that had flow targets
    cached = _jsonl(work / "edit_latents" / "manifest.jsonl")
    assert [r["id"] for r in cached] == [r["id"] for r in edit_train]
    assert all(os.path.isfile(work / "edit_latents" / r["target_latents"]) for r in cached)
    steps = [r for r in _jsonl(work / "lm" / "metrics.jsonl") if "step" in r]
    edit_steps = [r for r in steps if r.get("edit_step") == 1]
    assert edit_steps and all(r["flow_patches"] > 0 and _finite(r["flow"]) for r in edit_steps)
    assert any(r.get("edit_step") == 0 for r in steps)  # and TTS/ASR steps
    # sample.py edit ran every held-out pair, semantic ones with the transcript first
    requests = _jsonl(work / "requests" / "edit.jsonl")
    assert [r["id"] for r in requests] == [r["id"] for r in edit_heldout]
    assert [r["semantic"] for r in requests] == [r["edit_kind"] == "semantic" for r in edit_heldout]
    with open(out / "eval" / "edit.json", encoding="utf-8") as f:
        rep = json.load(f)
    assert rep["task"] == "edit" and rep["scored"] == rep["count"] == len(edit_heldout)
    assert set(rep["by_type"]) == {r["edit_type"] for r in edit_heldout}
    assert all(_finite(r["baseline_mcd"]) for r in rep["rows"])
    # the report's Editing section: one line per edit type plus the total, with the eval's numbers
    text = (out / "report.md").read_text(encoding="utf-8")
    section = text[text.index("## Editing"): text.index("## Timings")]
    for etype, t in rep["by_type"].items():
        row = re.search(rf"^\| {etype} \| (\d+)/(\d+) \| (\d+) \|", section, re.M)
        assert row and (int(row.group(1)), int(row.group(2)), int(row.group(3))) == (t["scored"], t["count"],
                                                                                  t["no_audio"]), etype
    base = re.search(r"do-nothing \(the source against the target\): ([0-9.]+) \|", text)
    assert base and abs(float(base.group(1)) - rep["mean"]["baseline_mcd"]) < 0.01


def test_quick_demo_distils_the_whisper_teacher_before_the_lm(quick_demo):
    """teacher -> S1 (from the S0 export) -> the LM starts from the S1 export; composed sentences in training."""
    out, _, _ = quick_demo
    work = out / "work"
    teacher = _jsonl(work / "teacher" / "manifest.jsonl")
    recipe = demo.RECIPES["quick"]
    assert len(teacher) == recipe["teacher"]["limit"]
    from unitok_jax.data.pipeline import load_teacher

    import soundfile as sf

    for r in teacher:
        feats = load_teacher(str(work / "teacher" / r["teacher"]), recipe["teacher"]["dim"])
        assert len(feats) == -(-sf.info(r["audio"]).frames // 320)  # 50 Hz rows over the utterance
    s1 = [r for r in _jsonl(work / "s1" / "metrics.jsonl") if "step" in r]
    assert s1 and all(_finite(r["loss"]) for r in s1)
    assert (work / "s1" / "export" / "unitok_config.json").is_file()
    cmds = json.loads((work / "commands.json").read_text())
    assert any("--config.train.objective=s1" in c and str(work / "vae" / "export") in c for c in cmds["s1"])
    assert any(f"--config.init.vae={work / 's1' / 'export'}" in c for c in cmds["lm"])
    train = _jsonl(work / "corpus" / "train.jsonl")
    assert sum("_c" in r["id"] for r in train) == recipe["corpus"]["composed"]


def test_rerun_resumes_without_redoing_phases(venv, quick_demo):
    out, _, _ = quick_demo
    before = (out / "work" / "timings.json").read_text()
    t0 = time.perf_counter()
    proc = _run(venv, "--out", str(out), "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in demo.PHASES[:-1]:
        assert f"-- {phase}: already done" in proc.stdout, phase
    assert "$ " not in proc.stdout  # no command was run again
    assert (out / "work" / "timings.json").read_text() == before
    assert time.perf_counter() - t0 < 60
    assert "(earlier run)" in (out / "report.md").read_text()


def test_a_different_recipe_in_the_same_folder_is_refused(venv, quick_demo):
    out, _, _ = quick_demo
    proc = _run(venv, "--out", str(out), "--quick", "--set", "lm.train.steps=3")
    assert proc.returncode == 1
    assert "different recipe" in proc.stderr


def test_recipe_overrides_and_config_flags():
    r = demo.build_recipe(False, ["vae.train.steps=7", "lm.data.buckets_seconds=[4.0]", "sample.cfg=1.5",
                                  "s1.train.steps=5", "teacher.limit=10"])
    assert r["vae"]["train.steps"] == 7 and r["sample"]["cfg"] == 1.5 and r["mode"] == "full"
    assert r["s1"]["train.steps"] == 5 and r["teacher"]["limit"] == 10
    assert "--config.train.steps=7" in demo.config_flags(r["vae"])
    assert "--config.data.buckets_seconds=(4.0,)" in demo.config_flags(r["lm"])
    assert demo.RECIPES["full"]["vae"]["train.steps"] != 7  # the defaults are not modified
    with pytest.raises(demo.DemoError):
        demo.build_recipe(True, ["nodot=1"])
    with pytest.raises(demo.DemoError):
        demo.build_recipe(True, ["model.x=1"])


def test_a_failing_phase_stops_the_demo_with_its_log(tmp_path, monkeypatch):
    """A command that fails: DemoError naming the phase, the exit status and the tail of its log; the phase is
    not recorded as done (a re-run tries it again)."""
    d = demo.Demo(str(tmp_path / "out"), demo.build_recipe(True, []), quiet=True)
    d.prepare(fresh=False)
    script = "import sys; print('step 1 ok'); print('boom: no such manifest', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(d, "vae", lambda: [demo.Job("vae", "vae", [demo.Cmd([sys.executable, "-c", script])])])
    with pytest.raises(demo.DemoError) as e:
        d.run_group(("vae",))
    msg = str(e.value)
    assert "phase vae" in msg and "exit status 3" in msg and "boom: no such manifest" in msg
    assert "vae" not in d.timings["phases"]
    # a command that exits 0 but leaves no output behind is a failure too
    monkeypatch.setattr(d, "vae", lambda: [demo.Job("vae", "vae", [demo.Cmd(
        [sys.executable, "-c", "pass"], expect=str(tmp_path / "never.json"))])])
    with pytest.raises(demo.DemoError, match="exit status 0 but no .*never.json"):
        d.run_group(("vae",))
