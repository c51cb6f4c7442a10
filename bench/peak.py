"""How close to the machine's limit a timed program runs: a same-run matmul peak and the achieved GFLOP/s.

A ratio to the reference says who is faster; it does not say whether either side is near what the CPU can do. This
module measures, in the benchmark's own process (same machine, same load, same XLA build), the float32 GFLOP/s of one
large jitted matmul -- the best a dense program can hope for here -- so each script can print its achieved GFLOP/s
next to it as "% of peak". It is imported by ``bench/vae.py``, ``bench/llm.py`` and ``bench/flow.py``.

FLOP counts of a timed program, two kinds (see ``unitok_jax/training/monitor.py``):

* :func:`xla_flops`: XLA's cost analysis of the compiled program. It counts a loop body (``lax.scan``,
  ``fori_loop``, ``while_loop``, so every ``nn.scan`` layer stack and the sampler's step loop) **once**, whatever
  its trip count, so for this project's programs it undercounts by about the depth; kept in the JSON for reference.
* :func:`traced_flops`: the matrix products (``dot_general``, convolutions, ``ragged_dot``) of the traced program,
  loop bodies times their trip counts (:func:`unitok_jax.training.monitor.matmul_flops`). Element-wise work is
  left out (a small fraction of a transformer's). This is the count the GFLOP/s columns use, unless a script has
  an analytic count of its own (``bench/llm.py``).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unitok_jax.training import monitor  # noqa: E402


def peak_size(quick: bool = False) -> int:
    """The matmul edge :func:`matmul_peak_gflops` uses: 2048 (17 GFLOP a call), 1024 for ``--quick`` runs."""
    return 1024 if quick else 2048


def matmul_peak_gflops(quick: bool = False, n: Optional[int] = None, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 ``n x n x n`` matmul (n = 2048, or 1024 with ``quick``), median of ``repeats``
    calls after two warm-up calls. Measured in the calling process so it sees the same machine load and XLA build as
    the benchmark it is printed next to (a shared machine's peak changes from run to run)."""
    n = n or peak_size(quick)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    # HIGHEST: a true float32 product even where the default precision would round the inputs (TF32, bf16 passes)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)).lower(a, b).compile()
    for _ in range(2):
        mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def xla_flops(compiled) -> Optional[float]:
    """FLOPs of a compiled program (``jax.jit(f).lower(*args).compile()``) by XLA's cost analysis, None when the
    backend gives none. ``cost_analysis()`` is a dict in recent JAX and a list of per-program dicts in older ones;
    both are handled (by :func:`unitok_jax.training.monitor.compiled_flops`). Loop bodies are counted once."""
    return monitor.compiled_flops(compiled)


def traced_flops(fn: Callable, *args, **kwargs) -> Optional[float]:
    """Matmul FLOPs of ``fn(*args, **kwargs)`` from its traced program, loop bodies times their trip counts (nothing
    is computed: abstract arguments are fine). None when a ``while_loop`` of unknown trip count was counted once,
    since the figure would then be an undercount presented as a fact."""
    count = monitor.matmul_flops(fn, *args, **kwargs)
    return None if count.unbounded_loops else float(count)


def achieved(flops: Optional[float], seconds: Optional[float], peak_gflops: Optional[float]) -> dict:
    """``{"gflops": count / 1e9, "gflop_s": achieved rate, "pct_of_peak": rate / peak * 100}`` (None where an input
    is missing)."""
    ok = flops is not None and seconds is not None and seconds > 0
    rate = flops / seconds / 1e9 if ok else None
    return {"gflops": None if flops is None else flops / 1e9, "gflop_s": rate,
            "pct_of_peak": 100.0 * rate / peak_gflops if rate is not None and peak_gflops else None}


def fmt(x: Optional[float], spec: str = ".1f") -> str:
    """A number for a table, "n/a" for None."""
    return "n/a" if x is None else format(x, spec)


def describe_peak(peak_gflops: float, quick: bool = False) -> str:
    """One line naming the peak and how it was measured, for under a table."""
    n = peak_size(quick)
    return (f"same-run matmul peak: {peak_gflops:.1f} GFLOP/s (jitted float32 {n}x{n}x{n}, median of 5 after "
            f"warm-up, {jax.devices()[0].platform}; measured once at the start: on a shared machine whose load changes "
            f"during the run, a row above 100 % means the load eased after the peak was measured)")


def run_info(quick: bool, peak_gflops: Optional[float]) -> dict:
    """What every benchmark's JSON records about its run: the machine and software, the reference's CPU against
    this one, and the same-run matmul peak."""
    import os
    import platform

    import reference

    return {"environment": {"jax": jax.__version__, "platform": jax.devices()[0].platform,
                            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "machine": platform.machine()},
            "cpu": reference.cpu_model(), "same_cpu_as_reference": reference.same_cpu(),
            "reference": reference.describe(), "matmul_peak_gflop_s": peak_gflops,
            "matmul_peak_n": peak_size(quick)}
