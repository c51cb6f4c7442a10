"""Training monitoring: TensorBoard + JSON-lines metrics, mel-spectrogram images, FLOP counts, MFU and throughput.

    with MetricWriter(workdir) as w:                       # workdir/tb/ (TensorBoard) + workdir/metrics.jsonl
        w.scalars(step, {"loss": loss, "audio_s_per_s": r})
        w.audio(step, "rec/0", wave)                        # float [-1, 1], mono
        w.image(step, "mel/0", mel_comparison(ref, rec))    # uint8 [H, W, 3]

    compiled = jax.jit(step).lower(state, batch).compile()
    flops = matmul_flops(step, state, batch)                # global, loop trip counts included (see below)
    peak = peak_flops_per_device()                          # None on CPU / unknown devices -> MFU "n/a"
    print(mfu(flops, step_seconds, jax.device_count(), peak))

FLOP counts, two of them:

* :func:`compiled_flops` reads XLA's cost analysis of a compiled program. Two caveats. (1) A loop body is counted
  **once**, whatever its trip count: every ``nn.scan`` layer stack (LLM, VAE backbones, semantic module, DiT) and
  the looped MoE (``moe_impl="loop"``, what "auto" picks for training shapes on CPU) are undercounted, by about the
  number of layers. (2) For a program compiled for several devices (SPMD, e.g. batch-sharded), the count is **per
  device**: XLA analyses the partitioned per-device module (checked on 8 simulated CPU devices: a batch-sharded
  matmul of 2·M·N·K FLOPs reports 2·M·N·K / 8, a contraction-sharded one reports the same plus the all-reduce's
  additions; ``tests/test_monitor.py`` keeps that checked). Multiply by the number of devices for a global count.
* :func:`matmul_flops` counts the FLOPs of the matrix products (``dot_general``, convolutions, ``ragged_dot``) in
  the traced program (jaxpr), multiplying loop bodies by their trip counts (``scan``; ``lax.cond`` takes its
  costliest branch; a ``while_loop`` whose trip count is unknown counts once and is reported). It is the *global*
  count (shapes are logical, before sharding) and it is the one to use for MFU. Element-wise work, FFTs and
  reductions are not included (they are a small fraction of a transformer step); gradient-checkpointed forwards
  recomputed in the backward pass are included (hardware FLOPs rather than model FLOPs).

MFU = global FLOPs per step / step seconds / (devices x peak FLOP/s per device), with the dense peak of the
compute dtype from :data:`PEAK_FLOPS` (see :func:`peak_flops_per_device`).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

# ------------------------------------------------------------------------------------------------ metric writer


def _to_number(v) -> float | int:
    a = np.asarray(jax.device_get(v))
    if a.size != 1:
        raise ValueError(f"a scalar metric must have one element, got shape {a.shape}")
    a = a.reshape(())
    if a.dtype.kind in "iub":
        return int(a)
    return float(a)


class MetricWriter:
    """Scalars, audio and images for TensorBoard (``workdir/tb/``, via tensorboardX) and every scalar record also as
    one JSON line ``{"step": step, key: value, ...}`` appended to ``workdir/metrics.jsonl`` (the training loop's
    format). Only process 0 writes in multi-host runs; on the others every method is a no-op. Values may be Python
    or numpy scalars or one-element (device) arrays; integer values stay integers in the JSON lines.
    ``tensorboard=False`` writes the JSON lines only."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = workdir
        self.active = jax.process_index() == 0
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.active:
            return
        step = int(step)
        record = {"step": step}
        record.update({k: _to_number(v) for k, v in values.items()})
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def audio(self, step: int, tag: str, wave, sample_rate: int = 16000) -> None:
        """A mono waveform (float, nominally in [-1, 1]; clipped), shape [L] or [1, L]."""
        if not self.active or self._tb is None:
            return
        w = np.asarray(jax.device_get(wave), np.float32).reshape(-1)
        self._tb.add_audio(tag, np.clip(w, -1.0, 1.0), int(step), sample_rate=int(sample_rate))

    def image(self, step: int, tag: str, hwc_uint8) -> None:
        """An RGB image, uint8 [H, W, 3] (e.g. :func:`mel_image` / :func:`mel_comparison`)."""
        if not self.active or self._tb is None:
            return
        img = np.asarray(hwc_uint8)
        if img.ndim != 3 or img.shape[-1] not in (1, 3, 4) or img.dtype != np.uint8:
            raise ValueError(f"image must be uint8 [H, W, 1|3|4], got {img.dtype} {img.shape}")
        self._tb.add_image(tag, img, int(step), dataformats="HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        """A text (markdown) in TensorBoard's text tab."""
        if not self.active or self._tb is None:
            return
        self._tb.add_text(tag, str(text), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ mel images


def _log_mel(wave, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> np.ndarray:
    import librosa

    w = np.asarray(jax.device_get(wave), np.float32).reshape(-1)
    if w.size < n_fft:
        w = np.pad(w, (0, n_fft - w.size))
    mel = librosa.feature.melspectrogram(y=w, sr=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels,
                                         fmax=sample_rate / 2, power=2.0)
    return 10.0 * np.log10(np.maximum(mel, 1e-10))  # dB, [n_mels, frames]


def _colorize(db: np.ndarray, vmax: float, top_db: float, cmap: str) -> np.ndarray:
    from matplotlib import colormaps

    x = np.clip((db - (vmax - top_db)) / top_db, 0.0, 1.0)[::-1]  # low frequencies at the bottom
    rgba = colormaps[cmap](x, bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def mel_image(wave, sample_rate: int = 16000, *, n_fft: int = 1024, hop: int = 256, n_mels: int = 80,
              top_db: float = 80.0, vmax: Optional[float] = None, cmap: str = "magma") -> np.ndarray:
    """Log-mel spectrogram of a mono waveform as an RGB image, uint8 [n_mels, frames, 3], low frequencies at the
    bottom. Colours span ``top_db`` dB below ``vmax`` (default: the loudest bin of this spectrogram)."""
    db = _log_mel(wave, sample_rate, n_fft, hop, n_mels)
    return _colorize(db, float(db.max()) if vmax is None else float(vmax), top_db, cmap)


def mel_comparison(ref, rec, sample_rate: int = 16000, *, gap: int = 2, **kwargs) -> np.ndarray:
    """Reference (top) and reconstruction (bottom) mel images on one colour scale (the reference's loudest bin),
    separated by ``gap`` white rows; the reconstruction is cut / zero-padded to the reference's length."""
    r = np.asarray(jax.device_get(ref), np.float32).reshape(-1)
    x = np.asarray(jax.device_get(rec), np.float32).reshape(-1)[: r.size]
    x = np.pad(x, (0, r.size - x.size))
    n_fft, hop, n_mels = kwargs.pop("n_fft", 1024), kwargs.pop("hop", 256), kwargs.pop("n_mels", 80)
    db_r = _log_mel(r, sample_rate, n_fft, hop, n_mels)
    vmax = kwargs.pop("vmax", float(db_r.max()))
    top_db, cmap = kwargs.pop("top_db", 80.0), kwargs.pop("cmap", "magma")
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    a = _colorize(db_r, vmax, top_db, cmap)
    b = _colorize(_log_mel(x, sample_rate, n_fft, hop, n_mels), vmax, top_db, cmap)
    sep = np.full((gap, a.shape[1], 3), 255, np.uint8)
    return np.concatenate([a, sep, b], axis=0)


# ------------------------------------------------------------------------------------------------ FLOPs and MFU


def compiled_flops(compiled) -> Optional[float]:
    """FLOPs of a compiled program (``jax.jit(f).lower(...).compile()``) from XLA's cost analysis, or None when the
    backend gives none. Per device for SPMD programs; loop bodies counted once (see the module docstring).
    ``cost_analysis()`` returns a dict in recent JAX and a list of per-program dicts in older releases."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # backend without cost analysis
        return None
    if ca is None:
        return None
    if isinstance(ca, Mapping):
        ca = [ca]
    total, found = 0.0, False
    for d in ca:
        if isinstance(d, Mapping) and "flops" in d:
            v = float(d["flops"])
            if math.isfinite(v) and v >= 0:
                total += v
                found = True
    return total if found else None


class FlopCount(float):
    """A float FLOP count with ``unbounded_loops``: while loops of unknown trip count that were counted once."""

    unbounded_loops: int = 0


def _shape_size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        k = _shape_size([lhs[i] for i in lc])
        return 2.0 * _shape_size(eqn.outvars[0].aval.shape) * k
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        return 2.0 * _shape_size(eqn.outvars[0].aval.shape) * _shape_size(rhs) / rhs[out_feature]
    if name in ("ragged_dot", "ragged_dot_general"):
        # lhs [M, K] x rhs [G, K, N] (each row meets one group): 2 M K N = 2 * |lhs| * |out| / M
        lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        return 2.0 * _shape_size(lhs) * _shape_size(out) / max(_shape_size(out[:-1]), 1)
    return 0.0


def _sub_jaxprs(params) -> list:
    out = []
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                out.append(x.jaxpr)
            elif isinstance(x, jax.extend.core.Jaxpr):
                out.append(x)
    return out


def _jaxpr_flops(jaxpr, counter: list) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr, counter)
        elif name == "cond":
            total += max((_jaxpr_flops(b.jaxpr, counter) for b in eqn.params["branches"]), default=0.0)
        elif name == "while":
            counter[0] += 1
            total += sum(_jaxpr_flops(j, counter) for j in _sub_jaxprs(eqn.params))
        else:
            total += _eqn_flops(eqn) + sum(_jaxpr_flops(j, counter) for j in _sub_jaxprs(eqn.params))
    return total


def matmul_flops(fn, *args, **kwargs) -> FlopCount:
    """Global FLOPs of the matrix products of ``fn(*args, **kwargs)`` from its jaxpr (``dot_general``: 2·M·N·K,
    convolutions, ``ragged_dot``), loop bodies times their trip counts. Abstract arguments
    (``jax.ShapeDtypeStruct``) are fine: nothing is computed or allocated. ``fn`` may be a jitted function (static
    arguments as it was jitted with) or a plain one. ``result.unbounded_loops`` counts while loops of unknown trip
    count (counted once)."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
    counter = [0]
    out = FlopCount(_jaxpr_flops(jaxpr.jaxpr, counter))
    out.unbounded_loops = counter[0]
    return out


# Dense (no structured sparsity) peak FLOP/s per JAX device, by compute dtype. Vendor figures:
#   TPU (Google Cloud TPU system architecture pages, per chip = per JAX device on these generations):
#     v4 275 TFLOP/s bf16; v5e 197; v5p 459; v6e (Trillium) 918. fp32 is not published (the MXU runs f32 matmuls
#     as several bf16 passes), so no fp32 entry.
#   NVIDIA datasheets (the "with sparsity" figures halved):
#     A100 (SXM4 and PCIe): bf16/fp16 312, TF32 156, FP32 (non-tensor) 19.5 TFLOP/s;
#     H100 SXM5: bf16 989.4 (1979 sparse), TF32 494.7 (989 sparse), FP32 66.9;
#     H100 PCIe: bf16 756 (1513 sparse), TF32 378 (756 sparse), FP32 51.2;
#     H100 NVL: bf16 835.5 (1671 sparse), TF32 417.5 (835 sparse), FP32 60;
#     H200 SXM: bf16 989.5 (1979 sparse), TF32 494.5 (989 sparse), FP32 67;
#     H200 NVL: bf16 835.5 (1671 sparse), TF32 417.5 (835 sparse), FP32 60.
# Keys are lower-case substrings of ``device.device_kind`` ("TPU v5 lite" = v5e, "TPU v5" = v5p, "TPU v6 lite" =
# v6e; GPUs report e.g. "NVIDIA H100 80GB HBM3" for the SXM part), tried in order: specific variants first.
_T = 1e12
PEAK_FLOPS: tuple = (
    ("tpu v6 lite", {"bfloat16": 918 * _T}),
    ("tpu v6e", {"bfloat16": 918 * _T}),
    ("tpu v5 lite", {"bfloat16": 197 * _T}),
    ("tpu v5e", {"bfloat16": 197 * _T}),
    ("tpu v5p", {"bfloat16": 459 * _T}),
    ("tpu v5", {"bfloat16": 459 * _T}),
    ("tpu v4", {"bfloat16": 275 * _T}),
    ("h200 nvl", {"bfloat16": 835.5 * _T, "tfloat32": 417.5 * _T, "float32": 60 * _T}),
    ("h200", {"bfloat16": 989.5 * _T, "tfloat32": 494.5 * _T, "float32": 67 * _T}),
    ("h100 nvl", {"bfloat16": 835.5 * _T, "tfloat32": 417.5 * _T, "float32": 60 * _T}),
    ("h100 pcie", {"bfloat16": 756 * _T, "tfloat32": 378 * _T, "float32": 51.2 * _T}),
    ("h100", {"bfloat16": 989.4 * _T, "tfloat32": 494.7 * _T, "float32": 66.9 * _T}),
    ("a100", {"bfloat16": 312 * _T, "tfloat32": 156 * _T, "float32": 19.5 * _T}),
)


def peak_flops_per_device(device=None, dtype: str = "bfloat16") -> Optional[float]:
    """Dense peak FLOP/s of one device (default ``jax.devices()[0]``) for matmuls in ``dtype`` ("bfloat16",
    "float16" (= bf16 rate), "tfloat32" (GPU tensor cores on float32 inputs at default precision), "float32"), or
    None when unknown. CPUs give None: their peak (cores x clock x FLOP/cycle of the SIMD units, e.g. 32 float32
    FLOP/cycle/core for two AVX2 FMA units, 64 with AVX-512) cannot be read reliably from JAX and shared machines
    rarely reach it, so pass an explicit peak to :func:`mfu` if you want a CPU figure."""
    device = device if device is not None else jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    dtype = {"bf16": "bfloat16", "float16": "bfloat16", "fp16": "bfloat16", "f32": "float32", "fp32": "float32",
             "tf32": "tfloat32"}.get(str(dtype), str(dtype))
    if getattr(device, "platform", "") == "cpu":
        return None
    for key, table in PEAK_FLOPS:
        if key in kind:
            return table.get(dtype)
    return None


def mfu(flops_per_step: Optional[float], step_seconds: Optional[float], num_devices: int,
        peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: ``flops_per_step`` (global, all devices) / ``step_seconds`` / (``num_devices`` x
    ``peak`` FLOP/s per device), or None when any input is missing (report "n/a"). A per-device count (XLA's cost
    analysis of an SPMD program) goes with ``num_devices=1``."""
    if flops_per_step is None or step_seconds is None or peak is None or not step_seconds > 0 or num_devices < 1:
        return None
    return float(flops_per_step) / float(step_seconds) / (num_devices * float(peak))


# ------------------------------------------------------------------------------------------------ throughput


class Throughput:
    """Step time and units per second (tokens, seconds of audio, ...) of a training loop.

    Call :meth:`update` after steps have *finished* (after fetching their metrics or ``block_until_ready``), with
    the number of steps and units since the previous call; the time between calls is attributed to them. The first
    ``skip`` updates (the step that compiles) are not counted: call ``update`` once right after the first step.
    ``update`` returns the interval's ``{"step_s", "units_per_s"}`` (None while skipping); :meth:`summary` the
    totals over the counted intervals (mean step time = total time / steps, plus the median of per-interval step
    times)."""

    def __init__(self, skip: int = 1, clock=time.perf_counter):
        self.skip = int(skip)
        self.clock = clock
        self._last = clock()
        self._updates = 0
        self.steps = 0
        self.seconds = 0.0
        self.units = 0.0
        self.step_times: list = []

    def start(self) -> None:
        """(Re)start the interval clock, e.g. right before the first step."""
        self._last = self.clock()

    def update(self, units: float = 0.0, steps: int = 1) -> Optional[dict]:
        now = self.clock()
        dt, self._last = now - self._last, now
        self._updates += 1
        if self._updates <= self.skip:
            return None
        steps = max(int(steps), 1)
        self.steps += steps
        self.seconds += dt
        self.units += float(units)
        self.step_times.append(dt / steps)
        return {"step_s": dt / steps, "units_per_s": float(units) / dt if dt > 0 else float("nan")}

    @property
    def step_seconds(self) -> Optional[float]:
        return self.seconds / self.steps if self.steps else None

    @property
    def units_per_second(self) -> Optional[float]:
        return self.units / self.seconds if self.seconds > 0 else None

    def summary(self) -> dict:
        return {"steps": self.steps, "step_s": self.step_seconds,
                "step_s_median": statistics.median(self.step_times) if self.step_times else None,
                "units_per_s": self.units_per_second}
