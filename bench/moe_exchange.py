"""Bytes one MoE layer moves for expert parallelism (issue 18): replicate + psum against the ragged all-to-all of
the routed rows, on simulated CPU devices (``data 2 x expert 4`` by default), at the release's MoE width
(D 2048, 64 experts, top-6, expert width 1408; bfloat16 compute).

* **psum** (``model.moe_dispatch=psum``, :func:`unitok_jax.moe.expert_parallel_ffn`): the layer is compiled for the
  mesh from abstract inputs and the collectives of its compiled HLO are read back: each ``all-reduce`` buffer
  (the float32 partial outputs of every token, summed over the expert axis) and what a ring all-reduce sends per
  device, 2 (g - 1) / g of the buffer.
* **a2a** (``model.moe_dispatch=a2a``, :func:`unitok_jax.moe.expert_parallel_a2a_ffn`): XLA:CPU cannot compile a
  ``ragged-all-to-all`` (the CPU path runs an all-gather emulation with the same results), so its traffic is
  counted from the routing itself: the rows each device sends to other devices (router of random weights over
  random tokens, in the layer's top-k), in the compute dtype, there and back. That the layer lowers to
  ``ragged_all_to_all`` (StableHLO, as a GPU / TPU compile would take it) is checked and printed.

  python bench/moe_exchange.py [--quick] [--tokens N] [--json PATH]
"""
from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unitok_jax import moe, sharding as shd  # noqa: E402
from unitok_jax.io import write_json  # noqa: E402
from unitok_jax.llm import OFFICIAL_LLM_CONFIG  # noqa: E402

BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def hlo_collectives(text: str) -> list[dict]:
    """Collective ops of a compiled HLO module: kind, result buffer bytes and group size."""
    out = []
    for line in text.splitlines():
        m = re.search(r"=\s*(\(?[a-z0-9]+\[[^=]*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        size = 0
        for dt, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(1)):
            size += BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        groups = re.search(r"replica_groups=\{\{([0-9,]+)\}", line)
        g = len(groups.group(1).split(",")) if groups else 1
        out.append({"op": m.group(2), "bytes": size, "group": g})
    return out


def layer(dispatch: str, d: int, e: int, k: int, f: int, dtype):
    return moe.MoE(num_experts=e, top_k=k, expert_dim=f, impl="ragged", dispatch=dispatch, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens (512 per data shard)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per data shard (default 4096; --quick 512)")
    ap.add_argument("--mesh", default="data=2,expert=4")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    c = OFFICIAL_LLM_CONFIG
    d, e, k, f = c["hidden_size"], c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    axes = {a: int(v) for a, v in (x.split("=") for x in args.mesh.split(","))}
    mesh = shd.make_mesh({"mesh": axes})
    ep, dp = axes.get("expert", 1), axes.get("data", 1) * axes.get("fsdp", 1)
    n = (args.tokens or (512 if args.quick else 4096)) * dp  # tokens of the global batch
    dtype = jnp.bfloat16
    rules = shd.DEFAULT_RULES
    x_abs = jax.ShapeDtypeStruct((n // 64, 64, d), dtype)

    # psum: compile for the mesh from abstract params / inputs, read the collectives
    m = layer("psum", d, e, k, f, dtype)
    boxed = shd.abstract_init(m, jnp.zeros(x_abs.shape, x_abs.dtype))
    t0 = time.perf_counter()
    sh = shd.shardings_for(boxed, mesh, rules)
    params_abs = jax.tree.map(lambda b, s: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=s), nn.unbox(boxed), sh)
    with shd.use_sharding(mesh, rules):
        x_abs = jax.ShapeDtypeStruct(x_abs.shape, x_abs.dtype,
                                     sharding=NamedSharding(mesh, PartitionSpec(tuple(a for a in ("data", "fsdp")
                                                                                     if a in axes))))
        compiled = jax.jit(lambda p, x: m.apply(p, x)[0]).lower(params_abs, x_abs).compile()
    compile_s = time.perf_counter() - t0
    colls = hlo_collectives(compiled.as_text())
    reduce = [c_ for c_ in colls if c_["op"] == "all-reduce" and c_["group"] == ep]
    psum_buffer = sum(c_["bytes"] for c_ in reduce)
    psum_sent = sum(c_["bytes"] * 2 * (c_["group"] - 1) / c_["group"] for c_ in reduce)

    # a2a: does the layer lower to ragged_all_to_all for a GPU / TPU compile (the CPU path emulates it)?
    real = jax.default_backend
    moe.jax.default_backend = lambda: "gpu"
    try:
        with shd.use_sharding(mesh, rules):
            m2 = layer("a2a", d, e, k, f, dtype)
            lowered = jax.jit(lambda p, x: m2.apply(p, x)[0]).lower(params_abs, x_abs).as_text()
    finally:
        moe.jax.default_backend = real
    ragged_ops = lowered.count("ragged_all_to_all")

    # a2a traffic from the routing: tokens split over data x expert, each slot sent to its expert's device
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, e)).astype(np.float32) / np.sqrt(d)
    idx = np.argsort(-(x @ w), axis=1)[:, :k]  # top-k of random router logits
    shards = idx.reshape(dp * ep, n // (dp * ep), k)
    e_loc = e // ep
    off = [int(np.sum(s // e_loc != (j % ep))) for j, s in enumerate(shards)]  # rows leaving device j
    rows_out = float(np.mean(off))
    a2a_sent = 2 * rows_out * d * np.dtype(dtype).itemsize  # there and back

    tok_dev = n // dp  # tokens per device on the psum path (replicated over the expert axis)
    res = {"mesh": axes, "tokens_global": n, "tokens_per_data_shard": n // dp, "d": d, "experts": e, "top_k": k,
           "compute_dtype": "bfloat16", "psum": {"all_reduce_buffer_bytes": psum_buffer,
                                               "ring_bytes_sent_per_device": psum_sent, "all_reduces": len(reduce),
                                               "compile_s": compile_s, "tokens_per_device": tok_dev},
           "a2a": {"routed_rows_leaving_a_device": rows_out, "bytes_sent_per_device": a2a_sent,
                   "ragged_all_to_all_in_stablehlo": ragged_ops, "tokens_per_device": n // (dp * ep)},
           "a2a_vs_psum_bytes": a2a_sent / psum_sent if psum_sent else None}
    print(f"MoE layer at the release's width (D {d}, {e} experts, top-{k}, bf16 compute), mesh {axes}, "
          f"{n} tokens ({n // dp} per data shard); jax {jax.__version__}, {jax.device_count()} simulated CPU devices")
    print(f"{'dispatch':<8} {'what moves, per device, one forward':<64} {'MB sent':>9}")
    print(f"{'psum':<8} {f'all-reduce of f32 [{tok_dev}, {d}] over {ep} devices (ring: 2(g-1)/g of it)':<64} "
          f"{psum_sent / 1e6:>9.1f}")
    print(f"{'a2a':<8} {f'{rows_out:.0f} routed rows x {d} bf16 to other devices, there and back':<64} "
          f"{a2a_sent / 1e6:>9.1f}")
    print(f"a2a / psum bytes: {res['a2a_vs_psum_bytes']:.3f}; the a2a layer lowers to {ragged_ops} "
          f"ragged_all_to_all ops for a GPU / TPU compile (psum compiled in {compile_s:.1f} s; "
          f"{len(reduce)} all-reduce over the expert axis)")
    if args.json:
        write_json(args.json, res, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
