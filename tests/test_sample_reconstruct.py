"""sample.py reconstruct end to end on the converted fixture VAE and real speech."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import soundfile as sf
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, REPO, SHARED_DATA
from unitok_jax import vae
from unitok_jax.audio import load_audio
from unitok_jax.convert import convert_reference, load, save


def test_reconstruct_writes_good_files_and_reports_bad_ones(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src)
    save_file(load_file(str(FIXTURES / "audio_vae.safetensors")), str(src / "model.safetensors"))
    kwargs = json.loads((FIXTURES / "audio_vae.config.json").read_text())["kwargs"]
    (src / "config.json").write_text(json.dumps(kwargs))
    save(convert_reference(str(src)), str(tmp_path / "ckpt"))

    speech = str(SHARED_DATA / "librispeech-1089-134686-0000.flac")
    stereo = tmp_path / "stereo44k.wav"
    t = np.arange(int(0.7 * 44100)) / 44100
    sf.write(stereo, np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.1 * np.sin(2 * np.pi * 330 * t)], 1), 44100)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....not really a wav")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "sample.py", "reconstruct", "--checkpoint", str(tmp_path / "ckpt"), speech, str(bad),
         str(stereo), "--out", str(out), "--batch-size", "2", "--quiet"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert r.returncode == 1, r.stdout + r.stderr  # one input failed
    assert "broken.wav" in r.stdout and "FAILED" in r.stdout
    assert "10.44" in r.stdout and "0.70" in r.stdout  # per-file durations
    assert sorted(os.listdir(out)) == ["librispeech-1089-134686-0000.wav", "stereo44k.wav"]
    got, sr = sf.read(out / "librispeech-1089-134686-0000.wav", dtype="float32")
    assert sr == 16000 and len(got) == 166960
    # same numbers as the library: posterior mean, decoded, 16-bit
    ck = load(str(tmp_path / "ckpt"))
    wave = load_audio(speech)
    enc = vae.encode(ck.params["vae"], ck.configs["vae"], jnp.asarray(wave)[None], sample=False)
    want = np.asarray(vae.decode(ck.params["vae"], ck.configs["vae"], enc.mean))[0, : len(wave)]
    np.testing.assert_allclose(got, np.clip(want, -1, 1), atol=2e-3)
    assert len(sf.read(out / "stereo44k.wav")[0]) == int(0.7 * 16000)


def test_reconstruct_from_jsonl(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src)
    save_file(load_file(str(FIXTURES / "audio_vae.safetensors")), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(json.loads((FIXTURES / "audio_vae.config.json").read_text())["kwargs"]))
    save(convert_reference(str(src)), str(tmp_path / "ckpt"))
    speech = str(SHARED_DATA / "librispeech-1089-134686-0000.flac")
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"id": "utt1", "wav": speech}) + "\n{broken\n")
    r = subprocess.run([sys.executable, "sample.py", "reconstruct", "--checkpoint", str(tmp_path / "ckpt"),
                        "--input", str(req), "--out", str(tmp_path / "out"), "--quiet"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "r.jsonl:2" in r.stdout, r.stdout + r.stderr
    assert os.listdir(tmp_path / "out") == ["utt1.wav"]
