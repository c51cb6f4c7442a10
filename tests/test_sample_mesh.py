"""Sampling on a device mesh (8 simulated CPU devices, in a subprocess: XLA's device count is fixed when jax starts).

* TTS (latents, waveform), ASR (text) and edit (text, latents) through :class:`unitok_jax.api.UniAudio` on the meshes
  (data 2 x fsdp 2 x expert 2) and (fsdp 4 x tensor 2) == the same calls on one device, float32, within 1e-5
  relative, for a batch of 3 requests of different lengths (3 rows padded to a batch of 4 on the mesh);
* the streaming generator on a mesh gives the offline waveforms (3 rows, different budgets);
* the params carry the shardings the rules give (expert weights split over ``expert``, never replicated there);
* bfloat16 params (the dtype policy of :func:`unitok_jax.model.param_dtypes`): the first LLM logits stay within
  5e-2 relative of float32 and bfloat16 TTS is finite;
* ``sample.py --mesh`` (one process, 8 devices) == ``sample.py`` without a mesh; 2 processes (``jax.distributed`` on
  localhost) == 1 process, with one ``results.jsonl``; a 2-process job killed mid-way resumes and completes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, SHARED_DATA, rel_err, speech_clip, tiny_uniaudio, xla_flags
from test_sample_tasks import SENTENCES, ckpt_dir  # noqa: F401  (the same tiny checkpoint as sample.py's other tests)
MESHES = {"dp_fsdp_ep": "data=2,fsdp=2,expert=2", "fsdp_tp": "fsdp=4,tensor=2"}
MESH_TASKS = {"dp_fsdp_ep": ("tts", "asr", "edit"), "fsdp_tp": ("tts",)}


def _env(devices: int, **kw) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), **kw)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if k not in kw:
            env.pop(k, None)
    return env


def _child(out_dir: str) -> None:
    """Runs in the 8-device subprocess: every output of every configuration into ``out_dir/<name>.npz``."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import NamedSharding

    from unitok_jax import generate, llm, model, text
    from unitok_jax.api import UniAudio
    from unitok_jax.convert import with_param_dtype
    from unitok_jax.generate import Sampler

    tok, cfg, params = tiny_uniaudio(SENTENCES * 4)
    speech, _ = sf.read(SHARED_DATA / "librispeech-1089-134686-0000.flac", dtype="float32")
    waves = [speech[:5000], speech[8000:14000], speech[20000:23000]]  # 3 inputs of different lengths
    texts = [SENTENCES[0], SENTENCES[1][:12], SENTENCES[2]]
    fast = Sampler(steps=2)  # 2 flow steps with guidance: the same program shape as 10, compiled and run faster

    def run(m, name, tasks=("tts", "asr", "edit")):
        out = {}
        tts = m.tts(texts, waves, [SENTENCES[3]] * 3, seed=1, max_patches=6, min_steps=100, sampler=fast)
        for i, w in enumerate(tts):
            out[f"tts_wave{i}"] = w
        if tasks == ("tts",):
            np.savez(os.path.join(out_dir, f"{name}.npz"), **out)
            return
        asr = m.asr(waves, max_new_tokens=6)
        ed = m.edit(waves, ["make it louder", "say it slower", "delete the word stew"], semantic=[False, False, True],
                    seed=2, max_text_tokens=6, max_patches=4, min_steps=100, sampler=fast)
        for i, o in enumerate(ed):
            out[f"edit_wave{i}"] = o.wave
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump({"asr": asr, "edit_text": [o.text for o in ed]}, f)
        np.savez(os.path.join(out_dir, f"{name}.npz"), **out)

    run(UniAudio(cfg, params, tok), "single")
    specs = {}
    for name, spec in MESHES.items():
        m = UniAudio(cfg, params, tok, mesh=spec)
        specs[name] = {jax.tree_util.keystr(k): [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
                       for k, v in jax.tree_util.tree_leaves_with_path(m.params)
                       if isinstance(v.sharding, NamedSharding)}
        # tensor parallelism: TTS (LLM, flow head, VAE decode) only; ASR and edit run the same LLM on the other mesh
        run(m, name, MESH_TASKS[name])
        if name == "dp_fsdp_ep":  # the streaming generator on the mesh == the offline waveform on the mesh
            ids, lengths = generate.pad_sequences([text.tts_prompt(tok, t, "", 2) for t in texts], dtype=np.int32)
            req = (ids, lengths, np.random.default_rng(0).standard_normal((3, 10, cfg.vae.latent_dim)).astype(
                np.float32), np.array([2, 2, 2], np.int32), np.array([5, 3, 4], np.int32), jax.random.key(3))
            kw = dict(sampler=fast, min_steps=100, mesh=m.mesh)
            off = generate.tts(m.params, cfg, *req, **kw)
            chunks = list(generate.tts_stream(m.params, cfg, *req, chunk_patches=2, **kw))
            spp = cfg.patch_size * cfg.vae.hop
            np.savez(os.path.join(out_dir, "stream.npz"),
                     **{f"stream{i}": np.concatenate([c.audio[i] for c in chunks]) for i in range(3)},
                     **{f"offline{i}": off.waves[i, : off.counts[i] * spp] for i in range(3)})
    with open(os.path.join(out_dir, "specs.json"), "w") as f:
        json.dump(specs, f)

    # bfloat16: the load-time policy (norms, router float32), the LLM computing in bfloat16
    dtypes = model.param_dtypes(jax.eval_shape(lambda: params), "bfloat16")
    p16 = jax.tree.map(lambda x, d: x.astype(d), params, dtypes)
    cfg16 = with_param_dtype("uniaudio", cfg, "bfloat16")
    ids = np.asarray([tok.encode(SENTENCES[0])], np.int32)
    logits = {}
    for tag, (c, p) in {"f32": (cfg, params), "bf16": (cfg16, p16)}.items():
        lm = model.llm_module(c)
        cache = llm.init_cache(c.llm, 1, ids.shape[1] + 4)
        lg, _, cache = llm.prefill(lm, model.llm_vars(p), cache, input_ids=ids, lengths=np.array([ids.shape[1]]))
        steps = [np.asarray(lg, np.float32)]
        for t in range(3):  # the first greedy decode steps, fed the float32 run's tokens
            tok_t = ids[:, -1:] if t == 0 else np.asarray([[3 + t]], np.int32)
            lg, _, cache = llm.decode_step(lm, model.llm_vars(p), cache, input_ids=tok_t[:, 0])
            steps.append(np.asarray(lg, np.float32))
        logits[tag] = np.stack(steps)
    tts16 = UniAudio(cfg16, p16, tok).tts(texts, waves, seed=1, max_patches=4, min_steps=100, sampler=fast)
    np.savez(os.path.join(out_dir, "bf16.npz"), logits_f32=logits["f32"], logits_bf16=logits["bf16"],
             tts_finite=np.array([np.isfinite(w).all() and w.size > 0 for w in tts16]))


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    proc = subprocess.run([sys.executable, __file__, "child", str(out)], cwd=REPO, env=_env(8), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _load(folder, name):
    with open(folder / f"{name}.json") as f:
        return dict(np.load(folder / f"{name}.npz")), json.load(f)


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sampling_on_a_mesh_equals_one_device(mesh_runs, mesh):
    ref, ref_txt = _load(mesh_runs, "single")
    got = dict(np.load(mesh_runs / f"{mesh}.npz"))
    if MESH_TASKS[mesh] == ("tts",):
        ref = {k: v for k, v in ref.items() if k.startswith("tts_")}
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert ref[k].size == 0 or rel_err(got[k], ref[k]) <= 1e-5, (k, rel_err(got[k], ref[k]))
    assert any(ref[f"tts_wave{i}"].size for i in range(3))  # the comparison covers real audio
    if "asr" in MESH_TASKS[mesh]:
        assert _load(mesh_runs, mesh)[1] == ref_txt  # ASR transcripts (language, text) and edit texts


def test_streaming_on_a_mesh_equals_offline(mesh_runs):
    d = dict(np.load(mesh_runs / "stream.npz"))
    for i in range(3):
        assert d[f"stream{i}"].shape == d[f"offline{i}"].shape and d[f"offline{i}"].size > 0
        assert rel_err(d[f"stream{i}"], d[f"offline{i}"]) <= 1e-5


def test_mesh_params_carry_the_rules_shardings(mesh_runs):
    with open(mesh_runs / "specs.json") as f:
        specs = json.load(f)
    ep = specs["dp_fsdp_ep"]
    experts = {k: v for k, v in ep.items() if k.endswith(("['wi_gate']", "['wi_up']", "['wo']"))}
    assert len(experts) == 3  # wi_gate, wi_up, wo
    for k, v in experts.items():  # [layers, E, in, out]: E over expert, never replicated there
        assert k.startswith("['model']") and v[1] == "expert", (k, v)
    # the word embedding [vocab, embed]: vocab over tensor, embed over fsdp (DEFAULT_RULES)
    assert specs["fsdp_tp"]["['model']['embed']['embedding']"] == ["tensor", "fsdp"]
    assert specs["dp_fsdp_ep"]["['model']['embed']['embedding']"] == ["tensor", "fsdp"]  # tensor: size 1


def test_bfloat16_logits_close_and_outputs_finite(mesh_runs):
    d = dict(np.load(mesh_runs / "bf16.npz"))
    assert d["logits_bf16"].shape == d["logits_f32"].shape
    err = rel_err(d["logits_bf16"], d["logits_f32"])
    assert err <= 5e-2, err  # bfloat16 has 8 mantissa bits: ~1e-2 relative after a few layers
    assert err > 0  # it really ran in bfloat16
    assert d["tts_finite"].all()


# ------------------------------------------------------------------------------------------------- sample.py


def _requests(tmp_path, n=6):
    """``n`` TTS requests of different text lengths (prompted)."""
    speech = speech_clip(tmp_path)
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"id": f"r{i}", "text": SENTENCES[i % 4][: 10 + 5 * i], "prompt_wav": speech,
                                       "prompt_text": SENTENCES[3]}) + "\n" for i in range(n)))
    return req


def _cmd(ckpt, req, out, *extra):
    return [sys.executable, "sample.py", "tts", "--checkpoint", str(ckpt), "--input", str(req), "--out", str(out),
            "--quiet", "--steps", "2", "--max-patches", "3", "--batch-size", "2", "--max-seconds", "30", *extra]


def _outputs(out):
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {r["id"]: sf.read(out / r["wav"], dtype="float32")[0] for r in rows}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(ckpt, req, out, *extra):
    port = _free_port()
    return [subprocess.Popen(_cmd(ckpt, req, out, *extra), cwd=REPO,
                             env=_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _assert_same(a: dict, b: dict, tol=1e-4):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.abs(a[k] - b[k]).max() <= tol, (k, np.abs(a[k] - b[k]).max())  # 16-bit PCM: 1 step = 3e-5


@pytest.fixture(scope="module")
def one_device(ckpt_dir, tmp_path_factory):
    """sample.py without a mesh, one process: the reference outputs."""
    tmp = tmp_path_factory.mktemp("one")
    req = _requests(tmp)
    r = subprocess.run(_cmd(ckpt_dir, req, tmp / "out"), cwd=REPO, env=_env(1), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _outputs(tmp / "out")
    assert len(ref) == 6 and all(w.size for w in ref.values())
    return req, ref


def test_sample_py_on_a_mesh_equals_one_device(ckpt_dir, one_device, tmp_path):
    req, ref = one_device
    mesh = tmp_path / "mesh"
    r = subprocess.run(_cmd(ckpt_dir, req, mesh, "--mesh", "data=2,fsdp=2,expert=2"), cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_outputs(mesh), ref)

    bad = subprocess.run(_cmd(ckpt_dir, req, tmp_path / "bad", "--mesh", "data=3"), cwd=REPO, env=_env(8),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--mesh data=3" in bad.stderr and "8" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()  # nothing written for a refused run


def test_sample_py_continuous_batching_equals_static(ckpt_dir, one_device, tmp_path):
    """``--slots 2 --rounds 1`` over a group of all 6 requests (rows refilled as they finish) == static batches."""
    req, ref = one_device
    r = subprocess.run(_cmd(ckpt_dir, req, tmp_path / "cont", "--slots", "2", "--rounds", "1", "--batch-size", "6"),
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_outputs(tmp_path / "cont"), ref)
    bad = subprocess.run(_cmd(ckpt_dir, req, tmp_path / "bad", "--slots", "0"), cwd=REPO, env=_env(1),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--slots" in bad.stderr and not (tmp_path / "bad").exists()


def test_two_processes_killed_resume_and_equal_one_process(ckpt_dir, one_device, tmp_path):
    """2 processes (jax.distributed on localhost, 1 device each), SIGKILLed once some requests have finished, then
    started again: the finished requests are not redone, one results.jsonl comes out, the outputs equal one
    process's."""
    req, ref = one_device
    out = tmp_path / "out"
    procs = _two_processes(ckpt_dir, req, out)
    deadline = time.time() + 300
    parts = [out / f"results.part-{i}.jsonl" for i in range(2)]
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(p.exists() and p.read_text().strip() for p in parts):
            break
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    done_before = {json.loads(x)["id"] for p in parts if p.exists() for x in p.read_text().splitlines()}
    assert 0 < len(done_before) < 6, done_before  # killed mid-way
    procs = _two_processes(ckpt_dir, req, out)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "process 0/2:" in outs[0][0] and "process 1/2:" in outs[1][0]
    redone = sum(int(o.split(" done")[0].rsplit(" ", 1)[-1]) for o, _ in outs)
    assert redone == 6 - len(done_before)  # finished requests were not redone
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.startswith("results.part")]  # merged
    _assert_same(_outputs(out), ref)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _child(sys.argv[2])
