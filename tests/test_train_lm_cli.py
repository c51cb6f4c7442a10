"""train.py stage lm end to end in real processes, on a few seconds of real speech (tiny configs, CPU):

* the loss goes down (text CE on the ASR rows, flow matching on the TTS rows);
* N steps in two processes with ``jax.distributed`` (one CPU device each, a data-parallel mesh of 2) == N steps in
  one process with two devices: same losses every step, same exported params, with whole steps of edit pairs among
  the TTS / ASR steps (``data.edit_manifest``: their own iterator, rows split across processes the same way)
  (resume after SIGKILL / SIGTERM is
  compared with a straight run in ``tests/test_preemption.py``);
* the export loads for inference (``UniAudio.load``) with the tokenizer trained for the run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, xla_flags
from unitok_jax.convert import load

STEPS = 8
TEXTS = ["he hoped there would be stew for dinner", "turnips and carrots and bruised potatoes",
         "and fat mutton pieces to be ladled out", "in thick peppered flour fattened sauce"]
HELD_TEXTS = ["stuff it into you his belly counselled him", "after early nightfall the yellow lamps"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_speech")
    wave, sr = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    lines = []
    for i, t in enumerate(TEXTS):  # 1.5 s pieces of real speech
        sf.write(root / f"p{i}.wav", wave[i * 24000 : (i + 1) * 24000], sr)
        lines.append(json.dumps({"id": f"p{i}", "audio": f"p{i}.wav", "text": t, "speaker": "1089"}))
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    held = []  # the next two 1.5 s pieces, for the held-out evaluation
    for i, t in enumerate(HELD_TEXTS, start=len(TEXTS)):
        sf.write(root / f"p{i}.wav", wave[i * 24000 : (i + 1) * 24000], sr)
        held.append(json.dumps({"id": f"h{i}", "audio": f"p{i}.wav", "text": t, "speaker": "1089"}))
    (root / "held.jsonl").write_text("\n".join(held) + "\n")
    # edit pairs over the same clips (source p_i, target p_{i+1}): two semantic with the <cot_text> chain, two acoustic
    edits = []
    for i, t in enumerate(TEXTS):
        semantic = i % 2 == 0
        edits.append(json.dumps({"id": f"e{i}", "audio": f"p{i}.wav", "text": t, "speaker": "1089",
                                 "target_audio": f"p{(i + 1) % 4}.wav", "target_text": TEXTS[(i + 1) % 4],
                                 "instruction": f"Delete the word '{t.split()[1]}'." if semantic else "Speak faster.",
                                 "edit_type": "delete" if semantic else "faster",
                                 "target_markup": f"{t.split()[0]} <edit></edit> {' '.join(t.split()[2:])}"
                                 if semantic else None}))
    (root / "edits.jsonl").write_text("\n".join(edits) + "\n")
    return str(root / "m.jsonl")


def _args(workdir, manifest, *extra):
    return ["train.py", "--config", "configs/lm.py:tiny", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", f"--config.train.steps={STEPS}", "--config.log_every=1",
            "--config.data.batch_size=4", "--config.train.warmup_steps=0", "--config.train.lr=3e-3",
            "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.checkpoint.every_steps=4",
            "--config.data.seq_len=256", "--config.data.max_patches=32",  # one compilation per run
            f"--config.data.edit_manifest={os.path.join(os.path.dirname(manifest), 'edits.jsonl')}",
            "--config.data.edit_fraction=0.3", *extra]  # seed 0: steps 1 and 8 are edit steps


def _env(**kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **kw)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if k not in kw:
            env.pop(k, None)
    return env


def _single(workdir, manifest, *extra):
    env = _env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    proc = subprocess.run([sys.executable, *_args(workdir, manifest, *extra)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows}  # a resumed run re-logs nothing twice; last record of a step wins


def _params(workdir):
    return load(os.path.join(workdir, "export")).params["uniaudio"]


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def straight(manifest, tmp_path_factory):
    """STEPS steps in one process with two devices: the run the other tests look at. It also evaluates on the
    held-out clips at the end (sample_every 8; the VAE stage's test checks the period in the same loop) and keeps
    checkpoints 4 and 8 (neither changes what it trains)."""
    w = tmp_path_factory.mktemp("lm_straight")
    held = os.path.join(os.path.dirname(manifest), "held.jsonl")
    proc = _single(w, manifest, f"--config.data.heldout_manifest={held}", "--config.sample_every=8",
                   "--config.sample_audio=2", "--config.checkpoint.keep=5")
    return w, proc.stdout


def test_lm_stage_loss_goes_down_and_exports(straight):
    w, out = straight
    assert f"done: {STEPS} steps" in out
    m = _metrics(w)
    assert sorted(m) == list(range(1, STEPS + 1))
    assert [s for s in m if m[s]["edit_step"]] == [1, STEPS]  # edit steps, with text and flow targets
    assert all(m[s]["text_tokens"] > 0 and m[s]["flow_patches"] > 0 for s in (1, STEPS))
    text = [m[s]["text_ce"] for s in m if m[s]["text_tokens"] > 0 and not m[s]["edit_step"]]
    flow = [m[s]["flow"] for s in m if m[s]["flow_patches"] > 0 and not m[s]["edit_step"]]
    assert len(text) >= 3 and len(flow) >= 3  # both tasks were trained (tts_fraction 0.75 per row)
    assert text[-1] < 0.8 * text[0], text
    assert flow[-1] < 0.9 * flow[0], flow
    assert all(m[s]["skipped_step"] == 0 for s in m)
    assert m[STEPS]["bad_records"] == 0  # every row fitted the fixed shapes
    assert os.listdir(os.path.join(w, "tb"))  # TensorBoard event files

    from unitok_jax.api import UniAudio

    model = UniAudio.load(os.path.join(w, "export"))
    assert model.tok.vocab_size <= model.cfg.llm.vocab_size
    assert model.cfg.llm.num_experts == 4 and model.cfg.patch_size == 5


def test_lm_heldout_evaluation_and_samples(straight):
    """At the end (step 8): the held-out loss (TTS + ASR sequences of the held-out clips), and for both clips a transcript
    (TensorBoard text, its CER in the metrics) and speech in the voice of the other clip (TensorBoard audio)."""
    from test_monitor import read_events, summaries

    w, out = straight
    assert "held-out evaluation: 4 sequences (TTS + ASR) of 2 clips" in out
    m = _metrics(w)
    keys = ("heldout/loss", "heldout/text_ce", "heldout/text_acc", "heldout/flow", "heldout/stop", "heldout/asr_cer")
    assert [s for s in m if any(k in m[s] for k in keys)] == [8]
    assert all(np.isfinite(m[8][k]) for k in keys)
    assert m[8]["heldout/loss"] > 0 and m[8]["heldout/asr_cer"] >= 0
    vals = summaries(read_events(str(w / "tb")))
    audio = {(s, t): v.audio for s, t, v in vals if v.HasField("audio")}
    assert set(audio) == {(8, f"samples/{i}/tts") for i in (0, 1)}
    assert audio[(8, "samples/0/tts")].sample_rate == 16000 and audio[(8, "samples/0/tts")].length_frames > 0
    texts = {(s, t): v.tensor.string_val[0].decode() for s, t, v in vals if t.endswith("/asr/text_summary")}
    assert set(texts) == {(8, f"samples/{i}/asr/text_summary") for i in (0, 1)}
    assert texts[(8, "samples/1/asr/text_summary")].startswith(f"reference: {HELD_TEXTS[1]}\n\ntranscript: ")


def test_export_any_checkpoint(straight, tmp_path, capsys):
    """``python -m unitok_jax.export DIR --step N``: the params of checkpoint N, on one device here (the run used a
    mesh of two); the last step's export equals the run's own export; a step that was not saved is refused."""
    import orbax.checkpoint as ocp

    from unitok_jax.export import main as export_main

    w, _ = straight
    assert export_main([str(w), "--step", "4", "--out", str(tmp_path / "e4")]) == 0
    with ocp.CheckpointManager(os.path.join(w, "checkpoints"), item_names=("state", "data")) as mgr:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # the run saved from a mesh of two devices
        saved = mgr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=one))
                            )["state"]["params"]
    exported = load(str(tmp_path / "e4")).params["uniaudio"]
    assert jax.tree.structure(exported) == jax.tree.structure(saved)
    assert _max_diff(exported, saved) == 0.0
    assert _max_diff(exported, _params(w)) > 0  # step 4 is not step 8
    assert export_main([str(w), "--out", str(tmp_path / "last")]) == 0  # default: the latest step
    assert _max_diff(load(str(tmp_path / "last")).params["uniaudio"], _params(w)) == 0.0
    with open(tmp_path / "e4" / "tokenizer.json") as a, open(os.path.join(w, "export", "tokenizer.json")) as b:
        assert a.read() == b.read()  # the run's tokenizer goes with every export
    assert export_main([str(w), "--step", "5"]) == 2
    assert "no checkpoint at step 5; it has steps [1, 4, 8]" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nothing")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_lm_stage_two_processes_equal_one_process(straight, manifest, tmp_path):
    """2 processes (1 CPU device each) for STEPS == 1 process (2 devices) for STEPS: the same loss at every step
    (same data order and noise) and the same params."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *_args(tmp_path, manifest)], cwd=REPO,
                              env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "done:" in outs[0][0] and "done:" not in outs[1][0]  # process 0 reports and exports
    a, b = _metrics(straight[0]), _metrics(tmp_path)
    assert sorted(b) == sorted(a)  # only process 0 writes metrics
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 * max(1.0, abs(a[s]["loss"])), (s, a[s], b[s])
        assert a[s]["tokens"] == b[s]["tokens"]
    assert _max_diff(_params(straight[0]), _params(tmp_path)) <= 1e-5
