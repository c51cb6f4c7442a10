"""Training monitoring (unitok_jax.training.monitor): TensorBoard event files read back, metrics.jsonl records,
FLOP counts (XLA cost analysis and the jaxpr matmul count), MFU arithmetic, the peak table, throughput and mel
images."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import types
import wave as wavlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitok_jax.training import monitor


def read_events(directory: str) -> list:
    """Every Event of the TensorBoard event files in ``directory`` (TFRecord framing: u64 length, u32 crc of the
    length, payload, u32 crc of the payload), parsed with tensorboardX's protobufs."""
    from tensorboardX.proto import event_pb2

    files = sorted(f for f in os.listdir(directory) if "tfevents" in f)
    assert files, f"no event file in {directory}"
    events = []
    for name in files:
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos: pos + 8])
            payload = data[pos + 12: pos + 12 + n]
            assert len(payload) == n, "truncated record"
            events.append(event_pb2.Event.FromString(payload))
            pos += 12 + n + 4
    return events


def summaries(events) -> list:
    """(step, tag, Summary.Value) for every summary value."""
    return [(e.step, v.tag, v) for e in events if e.HasField("summary") for v in e.summary.value]


def test_metric_writer_round_trip(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:  # an earlier run's line is kept
        f.write(json.dumps({"step": 0, "loss": 9.0}) + "\n")
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000).astype(np.float32)
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5, 0] = 255
    with monitor.MetricWriter(workdir) as w:
        w.scalars(1, {"loss": jnp.float32(2.5), "tokens": np.int32(7), "lr": 1e-4})
        w.scalars(2, {"loss": jnp.asarray([1.25]), "tokens": 9, "lr": 2e-4})
        w.audio(2, "rec/0", jnp.asarray(tone) * 3.0)  # clipped to [-1, 1]
        w.image(2, "mel/0", img)
        w.flush()
        with pytest.raises(ValueError):
            w.image(3, "bad", img.astype(np.float32))
        with pytest.raises(ValueError):
            w.scalars(3, {"vec": np.ones(3)})

    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert lines == [{"step": 0, "loss": 9.0}, {"step": 1, "loss": 2.5, "tokens": 7, "lr": 1e-4},
                     {"step": 2, "loss": 1.25, "tokens": 9, "lr": 2e-4}]
    assert isinstance(lines[1]["tokens"], int)

    vals = summaries(read_events(os.path.join(workdir, "tb")))
    scalars = {(s, t): (v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0])
               for s, t, v in vals if t in ("loss", "tokens", "lr")}
    assert scalars.keys() == {(s, t) for s in (1, 2) for t in ("loss", "tokens", "lr")}
    np.testing.assert_allclose([scalars[(1, "loss")], scalars[(2, "loss")], scalars[(1, "tokens")],
                                scalars[(2, "lr")]], [2.5, 1.25, 7, 2e-4], rtol=1e-6)

    (audio,) = [v.audio for s, t, v in vals if t == "rec/0" and s == 2]
    assert audio.sample_rate == 16000
    with wavlib.open(io.BytesIO(audio.encoded_audio_string)) as wf:
        assert wf.getframerate() == 16000 and wf.getnframes() == tone.size and wf.getnchannels() == 1
        pcm = np.frombuffer(wf.readframes(wf.getnframes()), np.int16)
    assert np.abs(pcm).max() >= 32000  # 1.5 x tone clipped at full scale
    np.testing.assert_allclose(pcm[:200] / 32767.0, np.clip(3 * tone[:200], -1, 1), atol=2e-4)

    (image,) = [v.image for s, t, v in vals if t == "mel/0" and s == 2]
    assert (image.height, image.width, image.colorspace) == (10, 20, 3)
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_metric_writer_jsonl_only_and_other_processes(tmp_path, monkeypatch):
    with monitor.MetricWriter(str(tmp_path / "a"), tensorboard=False) as w:
        w.scalars(5, {"x": 1.0})
        w.audio(5, "a", np.zeros(100))  # no-ops without TensorBoard
        w.image(5, "i", np.zeros((2, 2, 3), np.uint8))
    assert os.listdir(tmp_path / "a") == ["metrics.jsonl"]

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with monitor.MetricWriter(str(tmp_path / "b")) as w:
        assert not w.active
        w.scalars(1, {"x": 1.0})
        w.audio(1, "a", np.zeros(100))
        w.image(1, "i", np.zeros((2, 2, 3), np.uint8))
        w.flush()
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------ FLOPs


def test_compiled_flops_of_a_matmul():
    m, k, n = 96, 160, 48
    c = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    flops = monitor.compiled_flops(c)
    assert flops is not None and abs(flops - 2 * m * n * k) <= 0.01 * 2 * m * n * k, flops
    # the cost_analysis shapes of other JAX releases, and backends without one
    fake = types.SimpleNamespace
    assert monitor.compiled_flops(fake(cost_analysis=lambda: [{"flops": 3.0}, {"flops": 4.0}])) == 7.0
    assert monitor.compiled_flops(fake(cost_analysis=lambda: None)) is None
    assert monitor.compiled_flops(fake(cost_analysis=lambda: {"bytes accessed": 1.0})) is None

    def boom():
        raise NotImplementedError

    assert monitor.compiled_flops(fake(cost_analysis=boom)) is None


def test_matmul_flops_counts_loop_trips_where_xla_counts_once():
    m, d, steps = 32, 64, 6
    x, w = jnp.ones((m, d)), jnp.ones((d, d))

    def f(x, w):
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=steps)[0]

    one = 2 * m * d * d
    assert monitor.matmul_flops(f, x, w) == steps * one
    # abstract inputs, jitted function, backward pass (d/dx and d/dw: two more matmuls per step)
    spec = jax.ShapeDtypeStruct((m, d), jnp.float32), jax.ShapeDtypeStruct((d, d), jnp.float32)
    assert monitor.matmul_flops(jax.jit(f), *spec) == steps * one
    assert monitor.matmul_flops(jax.grad(lambda x, w: f(x, w).sum(), argnums=(0, 1)), *spec) == 3 * steps * one
    # XLA's cost analysis counts the loop body once (why the benchmarks use matmul_flops for MFU)
    xla = monitor.compiled_flops(jax.jit(f).lower(x, w).compile())
    assert one <= xla < 1.5 * one, xla
    # cond: the costlier branch; while with a traced trip count: once, reported
    g = jax.jit(lambda p, x, w: jax.lax.cond(p, lambda: x @ w @ w, lambda: x))
    assert monitor.matmul_flops(g, True, x, w) == 2 * one
    r = monitor.matmul_flops(lambda n, x, w: jax.lax.fori_loop(0, n, lambda i, h: h @ w, x), 3, x, w)
    assert r == one and r.unbounded_loops == 1
    # convolution (no padding): 2 x out elements x (in channels x kernel width)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "VALID")  # noqa: E731
    assert monitor.matmul_flops(conv, jnp.ones((2, 3, 32)), jnp.ones((4, 3, 5))) == 2 * (2 * 4 * 28) * 3 * 5


SHARDED = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from unitok_jax.training.monitor import compiled_flops, matmul_flops
    mesh = Mesh(np.array(jax.devices()), ("d",))
    m, k, n = 256, 128, 64
    sds = lambda s, p: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p))
    a, b = sds((m, k), P("d", None)), sds((k, n), P())
    f = jax.jit(jnp.matmul)
    print(json.dumps({"devices": jax.device_count(), "xla": compiled_flops(f.lower(a, b).compile()),
                      "jaxpr": matmul_flops(f, a, b), "global": 2 * m * n * k}))
""")


def test_sharded_cost_analysis_is_per_device():
    from conftest import xla_flags

    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    assert r["xla"] == pytest.approx(r["global"] / 8, rel=0.01)  # XLA: the per-device (partitioned) program
    assert r["jaxpr"] == r["global"]  # matmul_flops: the logical, global program


# ------------------------------------------------------------------------------------------------ MFU, peaks


def test_mfu_and_peak_table():
    assert monitor.mfu(4e12, 0.5, 4, 4e12) == pytest.approx(0.5)
    assert monitor.mfu(1e12, 2.0, 1, 1e12) == pytest.approx(0.5)
    assert monitor.mfu(None, 1.0, 1, 1e12) is None and monitor.mfu(1.0, 1.0, 1, None) is None
    assert monitor.mfu(1.0, 0.0, 1, 1e12) is None and monitor.mfu(1.0, None, 1, 1e12) is None

    def dev(kind, platform="gpu"):
        return types.SimpleNamespace(device_kind=kind, platform=platform)

    peak = monitor.peak_flops_per_device
    assert peak(dev("TPU v4", "tpu")) == 275e12
    assert peak(dev("TPU v5 lite", "tpu")) == 197e12
    assert peak(dev("TPU v5", "tpu")) == peak(dev("TPU v5p", "tpu")) == 459e12
    assert peak(dev("TPU v6 lite", "tpu")) == 918e12
    assert peak(dev("TPU v4", "tpu"), "float32") is None
    assert peak(dev("NVIDIA H100 80GB HBM3")) == pytest.approx(989.4e12)
    assert peak(dev("NVIDIA H100 PCIe")) == 756e12
    assert peak(dev("NVIDIA H100 80GB HBM3"), "tf32") == pytest.approx(494.7e12)
    assert peak(dev("NVIDIA H200")) == pytest.approx(989.5e12)
    assert peak(dev("NVIDIA H200 NVL"), "bf16") == pytest.approx(835.5e12)
    assert peak(dev("NVIDIA A100-SXM4-80GB"), "float32") == 19.5e12
    assert peak(dev("NVIDIA GeForce GTX 1080")) is None
    assert peak(jax.devices("cpu")[0]) is None


def test_throughput_skips_the_compile_step():
    now = [0.0]
    t = monitor.Throughput(clock=lambda: now[0])
    now[0] = 30.0
    assert t.update(units=100) is None  # first step: compilation, not counted
    now[0] = 32.0
    assert t.update(units=200, steps=4) == {"step_s": 0.5, "units_per_s": 100.0}
    now[0] = 33.0
    t.update(units=100, steps=1)
    s = t.summary()
    assert s["steps"] == 5 and s["step_s"] == pytest.approx(3.0 / 5) and s["units_per_s"] == pytest.approx(100.0)
    assert s["step_s_median"] == pytest.approx(0.75)
    assert monitor.Throughput().summary()["step_s"] is None


# ------------------------------------------------------------------------------------------------ mel images


def test_mel_images():
    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    noise = (0.1 * np.random.default_rng(0).standard_normal(sr)).astype(np.float32)
    a, b = monitor.mel_image(tone, sr), monitor.mel_image(jnp.asarray(noise), sr)
    assert a.dtype == np.uint8 and a.shape == (80, 1 + sr // 256, 3) and b.shape == a.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20
    assert a.std() > 10  # not a flat image
    # the tone's energy sits in the lower half (image rows are flipped: low frequencies at the bottom)
    lum = a.astype(float).sum(-1)
    assert lum[40:].mean() > lum[:40].mean()

    cmp_ = monitor.mel_comparison(tone, noise[: sr // 2], sr)
    assert cmp_.shape == (2 * 80 + 2, a.shape[1], 3) and cmp_.dtype == np.uint8
    np.testing.assert_array_equal(cmp_[:80], a)  # reference on top, on its own scale
    assert (cmp_[80:82] == 255).all()
    assert not np.array_equal(cmp_[82:], a)
    assert monitor.mel_image(np.zeros(100, np.float32)).shape[:2] == (80, 5)  # shorter than one FFT window: padded
