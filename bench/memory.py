#!/usr/bin/env python
"""Will it fit? Per-device memory of the official-size model on sampling machines, from abstract arrays only.

For each target (a machine: devices, memory per device, a mesh) this lowers and compiles, on simulated CPU devices
(``--xla_force_host_platform_device_count``, set here before jax starts) and from ``jax.ShapeDtypeStruct`` inputs
that carry their shardings (nothing is allocated):

* the TTS prefill :func:`unitok_jax.generate.tts_init` and the TTS loop :func:`unitok_jax.generate.tts_run` (LLM
  KV cache, semantic-module cache, DiT flow head, stop head), at several batch sizes;
* one LM-stage train step (``configs/lm.py:official``: float32 master params, AdamW, bfloat16 compute), at a fixed
  batch, for the train-step row of the table (``--no-train`` skips it).

and reports per device: parameter bytes (bfloat16 sampling params: norms and the MoE routers stay float32, the
DESIGN's dtype policy), KV-cache bytes (LLM + semantic cache) at batch 1 / 8 / 64, and XLA's memory analysis of each
compiled program (argument, output, alias and temp bytes). A program's peak is ``argument + output - alias + temp``;
the TTS peak is the larger of prefill and loop. A batch *fits* when that peak is at most ``(1 - margin)`` of the
device's memory (``--margin``, default 0.10: the runtime's own reservations, allocator fragmentation, and XLA's
per-backend differences from the CPU compile). The largest batch that fits is searched over powers of two: the
batches 1 / 8 / 64 are compiled, a line through their peaks predicts the boundary, and the powers of two around it
are compiled to confirm (the reported ``max_batch`` is always a compiled, measured batch).

In-run comparison: the parameter bytes per device in bfloat16 (the sampling policy) against float32 (what loading
the release without ``dtype=`` would hold), and each mesh against the whole model on one of its devices.

Caveats (printed with the table): the temp sizes come from XLA:CPU; GPU and TPU compilers fuse and schedule
differently; XLA:CPU converts bf16 matmul operands to f32, and its loop-invariant code motion would hoist an f32
copy of every scanned weight stack out of the layer loop (temp = 2x the params, a CPU-only artefact), so that pass
is disabled here (``--xla_disable_hlo_passes=while-loop-invariant-code-motion``). The MoE runs the ``"loop"``
grouped matmul (each expert tile reads its weights in place: temp ~ rows x width, like a real grouped GEMM);
``"ragged"`` on XLA:CPU lowers to a masked dense product over all experts and would overstate the temp memory. In
the train step the ``"loop"`` MoE's backward keeps every tile's expert-weight slice as a residual (``[layers, tiles,
embed, mlp]`` per projection: 57 GiB of the 89 GiB temp on 8xH100), which the GPU / TPU ``"ragged"`` path does not:
the train-step peak is an upper bound. The DiT of the release is not in configs/ (its ``ditar_config`` comes with
the checkpoint): ``configs/lm.py:official``'s stands in for it. The state of the loop is donated (the DESIGN's
convention), so its alias bytes are not counted twice; ``no-donate`` shows the peak without donation. A batch that
does not divide over the batch shards (``data`` x ``fsdp``) is compiled padded up to a multiple of them (as a
sampler on that mesh pads it; unsplit, the expert-parallel ``"loop"`` MoE does not lower at present: its
``lax.cond`` branches differ in their varying manual axes).

``--batch-axes data,fsdp,expert`` splits the batch (caches, activations) over the expert axis too: on an
experts-only mesh the caches are then no longer whole on every device (a rules change, not a preset; printed).

``--quick`` (< 2 min on 2 idle CPU cores): the full-size model (the layer stacks are scanned, so fewer layers would
not compile faster), but the 1xH100 and v5p-8 targets only, batches 1 and 8, no search and no train step.

  python bench/memory.py --official [--targets 1xH100,8xH100,v5e-8,v5p-8] [--mesh TARGET=data=1,fsdp=2,expert=4]
      [--margin 0.1] [--max-batch 1024] [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 1 << 30
# Memory per device (bytes) of the sampling machines; device counts as JAX sees them (one device per chip).
MACHINES = {
    # H100 SXM 80 GB: 81559 MiB total as nvidia-smi reports it
    "1xH100": {"devices": 1, "memory": 81559 << 20, "what": "1 x NVIDIA H100 80 GB"},
    "8xH100": {"devices": 8, "memory": 81559 << 20, "what": "8 x NVIDIA H100 80 GB (one node)"},
    # TPU v5e: 16 GiB HBM per chip; v5p: 95 GiB HBM per chip (v5p-8 = 4 chips, megacore)
    "v5e-8": {"devices": 8, "memory": 16 * GIB, "what": "TPU v5e-8 (8 chips x 16 GiB)"},
    "v5p-8": {"devices": 4, "memory": 95 * GIB, "what": "TPU v5p-8 (4 chips x 95 GiB)"},
}
DEFAULT_TARGETS = ("1xH100", "8xH100", "v5e-8", "v5p-8")
QUICK_TARGETS = ("1xH100", "v5p-8")
REPORT_BATCHES = (1, 8, 64)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", action="store_true", help="the official-size model (the default; the flag is "
                    "accepted for the command line of the issue)")
    ap.add_argument("--targets", default=None, help=f"comma-separated from {', '.join(MACHINES)}")
    ap.add_argument("--mesh", action="append", default=[], metavar="[TARGET=]SPEC",
                    help="mesh of a target instead of its preset (sharding.MESH_PRESETS), e.g. "
                    "v5e-8=data=1,fsdp=2,expert=4 or a preset name; without TARGET= it applies to every target "
                    "with that many devices. May be repeated.")
    ap.add_argument("--margin", type=float, default=0.10, help="fraction of device memory kept free (default 0.10)")
    ap.add_argument("--batches", default=None, help="batches compiled for the table (default 1,8,64)")
    ap.add_argument("--max-batch", type=int, default=1024, help="upper end of the batch search")
    ap.add_argument("--no-search", action="store_true", help="only the --batches, no max-batch search")
    ap.add_argument("--text", type=int, default=128, help="text tokens per request (bucket)")
    ap.add_argument("--prompt-patches", type=int, default=64, help="voice-prompt patches (10 per second)")
    ap.add_argument("--max-patches", type=int, default=512, help="output budget in patches (10 per second)")
    ap.add_argument("--flow-steps", type=int, default=10)
    ap.add_argument("--moe-impl", default="loop", help="MoE implementation compiled (see the module docstring)")
    ap.add_argument("--batch-axes", default=None, help="mesh axes of the logical 'batch' axis instead of the "
                    "rules' (data,fsdp), e.g. data,fsdp,expert: caches and activations split over the expert axis "
                    "too (the MoE then gathers the tokens over it)")
    ap.add_argument("--no-train", action="store_true", help="skip the LM train step")
    ap.add_argument("--train-rows", type=int, default=1, help="train rows per batch shard (data x fsdp)")
    ap.add_argument("--train-seq", type=int, default=1024, help="train sequence length (tokens)")
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the config's); the bytes are "
                    "those of that many layers, not scaled")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead of the official one (tests)")
    ap.add_argument("--memory-gib", type=float, default=None, help="override the memory per device (tests)")
    ap.add_argument("--quick", action="store_true", help="< 2 min on 2 CPU cores (see the module docstring)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return ap.parse_args(argv)


def _targets(args) -> list[str]:
    names = args.targets.split(",") if args.targets else list(QUICK_TARGETS if args.quick else DEFAULT_TARGETS)
    bad = [n for n in names if n not in MACHINES]
    if bad:
        raise SystemExit(f"unknown target(s) {bad}; choose from {sorted(MACHINES)}")
    return names


def _setup_devices(n: int) -> None:
    """Simulated CPU devices for the largest target; must run before jax is imported."""
    if "jax" in sys.modules:
        import jax

        if jax.device_count() < n:
            raise SystemExit(f"jax already started with {jax.device_count()} devices; {n} are needed: run "
                             f"bench/memory.py in a fresh process")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


# ------------------------------------------------------------------------------------------------ model pieces


def _imports():
    global jax, jnp, np, NamedSharding, P, shd, G, model, lm_configs, lm_data, lm_train, sharded, init_lm_state, \
        path_str
    import jax  # noqa: F401
    import jax.numpy as jnp  # noqa: F401
    import numpy as np  # noqa: F401
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: F401

    from unitok_jax import generate as G  # noqa: F401
    from unitok_jax import model  # noqa: F401
    from unitok_jax import sharding as shd  # noqa: F401
    from unitok_jax.configs import lm as lm_configs  # noqa: F401
    from unitok_jax.training import lm_data, lm_train, sharded  # noqa: F401
    from unitok_jax.training.lm_step import init_lm_state  # noqa: F401
    from unitok_jax.training.trees import path_str  # noqa: F401


def lm_config(variant: str, layers=None, moe_impl: str = "loop"):
    """The LM-stage ConfigDict (``configs/lm.py``) with the LLM cut to ``layers`` layers if given."""
    config = lm_configs.get_config(variant)
    config.model.moe_impl = moe_impl
    if layers is not None:
        llm = dict(config.model.bailingmm["llm_config"])
        llm["num_hidden_layers"] = int(layers)
        llm["first_k_dense_replace"] = min(int(llm.get("first_k_dense_replace", 0)), max(int(layers) - 1, 0))
        config.model.bailingmm["llm_config"] = llm
    return config


def sampling_config(config):
    """UniAudioConfig for sampling: LLM and flow head compute in bfloat16 (the official config's dtype)."""
    return lm_train.model_config(config)


ROUTERS = ("gate", "audio_gate", "image_gate")


def _is_float32_leaf(path) -> bool:
    """The DESIGN's dtype policy (as ``unitok_jax.model.keeps_float32``): norms and the MoE routers stay float32."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(n.endswith("norm") for n in names[:-1]):
        return True
    return len(names) >= 2 and names[-1] in ROUTERS and names[-2] == "moe"


def sampling_params(cfg, dtype: str):
    """Abstract params (``jax.eval_shape`` of :func:`unitok_jax.model.init_params`) in ``dtype`` (norms and routers
    float32). Uses ``unitok_jax.model.param_dtypes`` when the package has it."""
    abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    policy = getattr(model, "param_dtypes", None)
    if policy is not None:
        try:
            dtypes = policy(abstract, dtype)
            return jax.tree.map(lambda x, d: jax.ShapeDtypeStruct(x.shape, d), abstract, dtypes), "model.param_dtypes"
        except TypeError:
            pass
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(
            x.shape, x.dtype if (_is_float32_leaf(path) or not jnp.issubdtype(x.dtype, jnp.floating)) else dtype),
        abstract), "bench (scale / router leaves kept float32)"


def shard_bytes(x, sharding) -> int:
    """Bytes of one device's shard of ``x`` (a ShapeDtypeStruct) under ``sharding``."""
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    itemsize = jnp.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 8
    return int(math.prod(shape)) * itemsize


def tree_bytes(tree, shardings=None) -> int:
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding)) if shardings is not None \
        else [None] * len(leaves)
    return sum(shard_bytes(x, s) for x, s in zip(leaves, shs))


def with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _axes_size(mesh, axes) -> int:
    return math.prod(int(mesh.shape[a]) for a in axes)


def batch_axes_rule(rules) -> tuple:
    target = shd.rule_target(rules, "batch")
    return tuple(target) if isinstance(target, (tuple, list)) else ((target,) if target else ())


def batch_axes(mesh, rules, batch: int) -> tuple:
    """Mesh axes the ``batch`` logical axis maps to, if the batch divides over them (else replicated)."""
    axes = batch_axes_rule(rules)
    axes = tuple(a for a in axes if int(mesh.shape.get(a, 1)) > 1)
    return axes if axes and batch % _axes_size(mesh, axes) == 0 else ()


def state_shardings(state, mesh, rules, batch: int):
    """Shardings of the TTS loop state: the batch dim over the batch axes (``data`` x ``fsdp``) where it divides;
    KV caches ``[L, B, S, K, d]`` also over the axis ``kv_heads`` maps to (``tensor``) where it divides."""
    bat = batch_axes(mesh, rules, batch)
    bspec = (bat if len(bat) > 1 else bat[0]) if bat else None
    kv = shd.rule_target(rules, "kv_heads")
    kv = kv if isinstance(kv, str) and int(mesh.shape.get(kv, 1)) > 1 else None

    def spec(path, x):
        names = path_str(path).split("/")  # dict keys and loop-state fields alike
        if names[-1] in ("k", "v") and len(x.shape) == 5:
            kvs = kv if kv and x.shape[3] % int(mesh.shape[kv]) == 0 else None
            return NamedSharding(mesh, P(None, bspec, None, kvs, None))
        if names[0] == "knobs" or not x.shape or x.shape[0] != batch:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(bspec))

    return jax.tree_util.tree_map_with_path(spec, state)


def cache_bytes(state, shardings) -> dict:
    """Per-device bytes of the LLM KV cache and the semantic-module cache of a TTS state (``generate.TTSState``)."""
    return {"llm": tree_bytes(state.cache, shardings.cache), "sem": tree_bytes(state.sem, shardings.sem)}


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


@dataclasses.dataclass
class Workload:
    text: int
    prompt_patches: int
    max_patches: int
    flow_steps: int


def padded_batch(mesh, rules, batch: int) -> int:
    """``batch`` rounded up to a multiple of the batch shards (data x fsdp): a smaller batch is compiled as that
    many rows (padding rows), as a sampler on the mesh pads it. (Compiling it unsplit fails in the expert-parallel
    "loop" MoE: see the module docstring.)"""
    n = _axes_size(mesh, tuple(a for a in batch_axes_rule(rules) if a in mesh.shape))
    return -(-batch // n) * n


def tts_programs(cfg, params, param_sh, mesh, rules, batch: int, w: Workload) -> dict:
    """Lower and compile the TTS prefill and loop at ``batch`` (padded to the batch shards); their memory analyses
    and the cache bytes."""
    batch = padded_batch(mesh, rules, batch)
    p, c = cfg.patch_size, cfg.vae.latent_dim
    rep = NamedSharding(mesh, P())
    bat = batch_axes(mesh, rules, batch)
    row = NamedSharding(mesh, P(bat if len(bat) > 1 else (bat[0] if bat else None)))
    sds = lambda shape, dtype, sh=row: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sh)  # noqa: E731
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    knobs = {k: sds((), jnp.float32, rep) for k in ("cfg", "sigma", "temperature", "sway", "threshold")}
    args = (sds((batch, w.text), jnp.int32), sds((batch,), jnp.int32),
            sds((batch, w.prompt_patches * p, c), jnp.float32), sds((batch,), jnp.int32), sds((batch,), jnp.int32),
            key, sds((batch,), jnp.int32), sds((batch,), jnp.int32), knobs)
    params_in = with_shardings(params, param_sh)
    init = lambda prm, *a: G.tts_init(prm, cfg, *a, max_patches=w.max_patches)  # noqa: E731
    state = jax.eval_shape(init, params, *args)
    st_sh = state_shardings(state, mesh, rules, batch)
    out = {"compiled_batch": batch, "cache": cache_bytes(state, st_sh)}
    t0 = time.perf_counter()
    with shd.use_sharding(mesh, rules):
        init_c = jax.jit(init, in_shardings=(param_sh,) + tuple(jax.tree.map(lambda a: a.sharding, args)),
                         out_shardings=st_sh).lower(params_in, *args).compile()
        run = lambda prm, s, limit: G.tts_run(prm, cfg, s, limit, steps=w.flow_steps)  # noqa: E731
        run_c = jax.jit(run, in_shardings=(param_sh, st_sh, rep), out_shardings=st_sh, donate_argnums=(1,)).lower(
            params_in, with_shardings(state, st_sh), jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)).compile()
    out["compile_s"] = time.perf_counter() - t0
    out["init"], out["run"] = memory(init_c), memory(run_c)
    out["peak"] = max(out["init"]["peak"], out["run"]["peak"])
    out["peak_no_donate"] = max(out["init"]["peak"], out["run"]["peak"] + out["run"]["alias"])
    return out


def train_program(config, mesh, rules, rows_per_shard: int, seq: int, patches: int = 64) -> dict:
    """Lower and compile one LM-stage train step (``configs/lm.py``: float32 params + AdamW state, bfloat16
    compute) on ``mesh`` from abstract state and batch (as ``tests/test_lm_sharded.py`` lowers it)."""
    cfg = lm_train.model_config(config)
    params_abs = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    opt = lm_train.optimizer(config, params_abs)
    state_abs = jax.eval_shape(lambda: init_lm_state(model.init_params(cfg, jax.random.key(0)), opt,
                                                     jax.random.key(1)))
    step = lm_train.step_function(config, cfg, opt)
    param_sh = sharded.param_shardings(cfg, params_abs, mesh, rules)
    state_sh = sharded.state_shardings(state_abs, opt, param_sh, mesh)
    b, s = rows_per_shard * sharded.batch_shards(mesh), seq
    shapes = lm_data.batch_shapes(b, s, patches, cfg.patch_size, cfg.vae.latent_dim)
    t0 = time.perf_counter()
    compiled = sharded.jit_step(step, state_sh, mesh, rules).lower(
        sharded.abstract_state(state_abs, state_sh), sharded.abstract_batch(shapes, mesh)).compile()
    out = {"batch": b, "seq": s, "state_bytes": tree_bytes(state_abs, state_sh), **memory(compiled),
           "compile_s": time.perf_counter() - t0}
    return out


# ------------------------------------------------------------------------------------------------ the search


def _fits(peak: int, capacity: int, margin: float) -> bool:
    return peak <= (1.0 - margin) * capacity


def search_max_batch(measure, compiled: dict, capacity: int, margin: float, max_batch: int) -> tuple[int, list]:
    """Largest power-of-two batch <= ``max_batch`` whose compiled peak fits. ``compiled``: {batch: peak} already
    measured (extended in place by ``measure(batch) -> peak``). A line through the measured peaks predicts the
    boundary; the powers of two around it are compiled to confirm. Returns (max batch or 0, batches compiled)."""
    new = []

    def peak(b):
        if b not in compiled:
            compiled[b] = measure(b)
            new.append(b)
        return compiled[b]

    limit = (1.0 - margin) * capacity
    if not _fits(peak(1), capacity, margin):
        return 0, new
    bs = sorted(compiled)
    if len(bs) >= 2:
        ok = [b for b in bs if compiled[b] <= limit]
        over = [b for b in bs if compiled[b] > limit]
        # the measured pair around the boundary, else the two largest
        b0, b1 = (max(ok), min(over)) if ok and over and max(ok) < min(over) else (bs[-2], bs[-1])
        slope = max((compiled[b1] - compiled[b0]) / (b1 - b0), 1.0)
        guess = max(1, int((limit - compiled[b0]) / slope + b0))
    else:
        guess = 1
    b = 1 << max(0, min(guess, max_batch).bit_length() - 1)  # the largest power of two <= guess
    while b > 1 and not _fits(peak(b), capacity, margin):
        b //= 2
    while 2 * b <= max_batch and _fits(peak(2 * b), capacity, margin):
        b *= 2
    return b, new


# ------------------------------------------------------------------------------------------------ main


def _mesh_for(target: str, overrides: list[str]) -> dict:
    n = MACHINES[target]["devices"]
    sizes = shd.mesh_sizes(target)
    for o in overrides:
        name, eq, spec = o.partition("=")
        if eq and name in MACHINES:
            if name == target:
                sizes = shd.parse_mesh(spec)
        else:
            s = shd.parse_mesh(o)
            if math.prod(s.values()) == n:
                sizes = s
    if math.prod(v for v in sizes.values() if v > 0) != n:
        raise SystemExit(f"mesh {sizes} of target {target} does not have {n} devices")
    return {a: int(sizes.get(a, 1)) for a in shd.MESH_AXES}


def _mesh_str(sizes: dict) -> str:
    return ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "1 device"


def gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = _targets(args)
    _setup_devices(max(MACHINES[t]["devices"] for t in targets))
    # XLA:CPU upcasts bfloat16 matmuls to float32; loop-invariant code motion would then hoist the float32 copy of
    # every scanned weight stack out of the layer loop (2x the params as temp, a CPU-only artefact).
    if "while-loop-invariant-code-motion" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] += " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
    # Nothing is run: no LLVM optimisation of the CPU code (about 40 % less compile time; the buffer assignment that
    # memory_analysis reports is made on the HLO before it, so the sizes are the same).
    if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
    _imports()
    t_start = time.perf_counter()
    rules = shd.DEFAULT_RULES
    if args.batch_axes:
        axes = tuple(a for a in args.batch_axes.split(",") if a)
        rules = (("batch", axes),) + tuple(r for r in rules if r[0] != "batch")
    variant = "tiny" if args.tiny else "official"
    full_layers = int(lm_configs.get_config(variant).model.bailingmm["llm_config"]["num_hidden_layers"])
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else ",".join(map(str, REPORT_BATCHES))))
               .split(",")]
    search = not (args.quick or args.no_search)
    train = not (args.quick or args.no_train)
    w = Workload(args.text, args.prompt_patches, args.max_patches, args.flow_steps)
    layers = args.layers or full_layers
    config = lm_config(variant, layers, args.moe_impl)
    cfg = sampling_config(config)
    params, policy = sampling_params(cfg, "bfloat16")
    params32, _ = sampling_params(cfg, "float32")
    devices = jax.devices()
    rows = []
    for target in targets:
        m = MACHINES[target]
        n_dev = m["devices"]
        capacity = int(args.memory_gib * GIB) if args.memory_gib else m["memory"]
        sizes = _mesh_for(target, args.mesh)
        mesh = shd.make_mesh({"mesh": sizes}, devices=devices[:n_dev])
        print(f"[{time.perf_counter() - t_start:6.0f} s] {target}: mesh {_mesh_str(sizes)}", file=sys.stderr,
              flush=True)

        param_sh = shd.uniaudio_shardings(cfg, params, mesh, rules)
        param_bytes = tree_bytes(params, param_sh)
        param_bytes32 = tree_bytes(params32, param_sh)
        param_bytes_1dev = tree_bytes(params)
        results = {}

        def measure(b):
            t = tts_programs(cfg, params, param_sh, mesh, rules, b, w)
            r = {"compiled_batch": t["compiled_batch"], "llm_cache": t["cache"]["llm"],
                 "sem_cache": t["cache"]["sem"], "peak": t["peak"],
                 "peak_no_donate": t["peak_no_donate"], "compile_s": t["compile_s"]}
            for prog in ("init", "run"):
                r.update({f"{prog}_{k}": v for k, v in t[prog].items()})
            results[b] = r
            print(f"[{time.perf_counter() - t_start:6.0f} s]   batch {b}: peak {gib(r['peak'])} GiB "
                  f"(compiled in {r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
            return r["peak"]

        peaks = {}
        for b in batches:
            peaks[b] = measure(b)
        searched = []
        if search:
            max_batch, searched = search_max_batch(measure, peaks, capacity, args.margin, args.max_batch)
        else:
            ok = [b for b in sorted(peaks) if _fits(peaks[b], capacity, args.margin)]
            max_batch = ok[-1] if ok else 0
        tr = None
        if train:
            try:
                tr = train_program(config, mesh, shd.DEFAULT_RULES, args.train_rows, args.train_seq)
                tr["fits"] = _fits(tr["peak"], capacity, args.margin)
            except Exception as e:  # noqa: BLE001 -- reported in the table, the other targets go on
                tr = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            print(f"[{time.perf_counter() - t_start:6.0f} s]   train step: "
                  f"{gib(tr.get('peak'))} GiB", file=sys.stderr, flush=True)
        b1 = results[min(results)]
        rows.append({
            "target": target, "what": m["what"], "devices": n_dev, "mesh": sizes,
            "memory_bytes_per_device": capacity, "usable_bytes_per_device": int((1 - args.margin) * capacity),
            "param_bytes_per_device": param_bytes, "param_bytes_per_device_float32": param_bytes32,
            "param_bytes_one_device": param_bytes_1dev,
            "peak_bytes_per_device": b1["peak"], "peak_batch": min(results),
            "fits": max_batch >= 1, "max_batch": max_batch,
            "max_batch_peak_bytes_per_device": results[max_batch]["peak"] if max_batch else None,
            "kv_cache_bytes_per_device": {b: {"llm": results[b]["llm_cache"], "semantic": results[b]["sem_cache"]}
                                          for b in sorted(results)},
            "tts": {b: results[b] for b in sorted(results)},
            "batches_searched": searched, "train_step": tr,
        })
    wall = time.perf_counter() - t_start
    report(rows, args, w, policy, layers, wall)
    if args.json:
        out = {"benchmark": "memory", "quick": args.quick, "official": not args.tiny, "margin": args.margin,
               "workload": dataclasses.asdict(w), "moe_impl": args.moe_impl, "param_dtype_policy": policy,
               "llm_layers": layers, "batch_axes": list(batch_axes_rule(rules)), "wall_s": wall,
               "environment": {"jax": jax.__version__, "python": platform.python_version(),
                               "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
               "rows": rows}
        from unitok_jax.io import write_json

        write_json(args.json, out, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def report(rows, args, w: Workload, policy: str, layers: int, wall: float) -> None:
    print(f"Will it fit? {'tiny test model' if args.tiny else 'official Ming-UniAudio-16B-A3B'}, bfloat16 sampling "
          f"params ({policy}); TTS: text {w.text} tokens, voice prompt {w.prompt_patches} patches, up to "
          f"{w.max_patches} patches out, {w.flow_steps} flow steps; MoE '{args.moe_impl}'. Per device, GiB. "
          f"Fits: compiled peak <= {100 * (1 - args.margin):.0f} % of the device memory (margin "
          f"{100 * args.margin:.0f} %).")
    if args.quick:
        print("--quick: the full-size model on two targets at batches 1 and 8 only (no max-batch search: 'max B' is "
              "the largest of those that fits; no train step).")
    if args.batch_axes:
        print(f"batch (caches, activations) split over {args.batch_axes} (--batch-axes), not the rules' data,fsdp.")
    if args.layers:
        print(f"LLM cut to {layers} layers (--layers): not the official size.")
    hdr = (f"{'target':<7} {'mesh':<17} {'mem':>6} {'params':>7} {'f32 par':>7} {'1-dev':>6} "
           + " ".join(f"{'kv@' + str(b):>7}" for b in REPORT_BATCHES)
           + f" {'peak@b0':>7} {'temp@b0':>7} {'fits':>4} {'max B':>5} {'peak@max':>8} {'train':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        kv = r["kv_cache_bytes_per_device"]
        tts1 = r["tts"][r["peak_batch"]]
        tr = r["train_step"]
        tr_s = "-" if tr is None else ("error" if "error" in tr else f"{gib(tr['peak'])}{'' if tr['fits'] else '!'}")
        print(f"{r['target']:<7} {_mesh_str(r['mesh']):<17} {gib(r['memory_bytes_per_device']):>6} "
              f"{gib(r['param_bytes_per_device']):>7} {gib(r['param_bytes_per_device_float32']):>7} "
              f"{gib(r['param_bytes_one_device']):>6} "
              + " ".join(f"{gib(kv[b]['llm'] + kv[b]['semantic']) if b in kv else '-':>7}" for b in REPORT_BATCHES)
              + f" {gib(r['peak_bytes_per_device']):>7} {gib(max(tts1['init_temp'], tts1['run_temp'])):>7} "
              f"{'yes' if r['fits'] else 'NO':>4} {r['max_batch']:>5} {gib(r['max_batch_peak_bytes_per_device']):>8} "
              f"{tr_s:>7}")
    print("\nparams: bf16 (norms, routers f32) per device; f32 par: the same params all float32; 1-dev: bf16 "
          "params of the whole model on one device; kv@B: LLM KV cache + semantic-module cache at batch B;\n"
          "peak@b0 / temp@b0: at the smallest batch compiled (1 unless --batches says otherwise); peak = argument + "
          "output - alias + temp of the larger of tts_init / tts_run (state donated);\n"
          "train: peak of one LM train step (f32 params + AdamW, bf16 compute; '!' = does not fit).")
    print("\nper batch (GiB per device): LLM cache / semantic cache / prefill peak (temp) / loop peak (temp) / "
          "loop peak without donation")
    for r in rows:
        for b, t in r["tts"].items():
            as_ = f"B={b}" + (f" (as {t['compiled_batch']})" if t["compiled_batch"] != b else "")
            print(f"  {r['target']:<7} {as_:<12} {gib(t['llm_cache']):>6} / {gib(t['sem_cache']):>6} / "
                  f"{gib(t['init_peak']):>6} ({gib(t['init_temp'])}) / {gib(t['run_peak']):>6} "
                  f"({gib(t['run_temp'])}) / {gib(t['peak_no_donate']):>6}")
        tr = r["train_step"]
        if tr:
            if "error" in tr:
                print(f"  {r['target']:<7} train step: {tr['error']}")
            else:
                print(f"  {r['target']:<7} train step, batch {tr['batch']} x {tr['seq']}: state "
                      f"{gib(tr['state_bytes'])}, argument {gib(tr['argument'])}, output {gib(tr['output'])}, "
                      f"alias {gib(tr['alias'])}, temp {gib(tr['temp'])}, peak {gib(tr['peak'])} "
                      f"({'fits' if tr['fits'] else 'does not fit'})")
    print("\ncaveats: temp sizes are XLA:CPU's (GPU / TPU compilers schedule differently; XLA:CPU also converts each "
          "layer's bf16 weights to f32 for its matmuls, which GPU / TPU do not); loop-invariant code motion is off "
          "(else XLA:CPU hoists an f32 copy of every weight stack); the DiT is configs/lm.py:official's stand-in;\n"
          "the train step is an upper bound: the 'loop' MoE's backward keeps every tile's expert-weight slice "
          "([layers, tiles, embed, mlp] x 3 projections) as a residual, which the GPU / TPU 'ragged' path does not.")
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
