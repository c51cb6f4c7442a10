"""Compiled, batched generation: TTS, ASR, edit and streaming TTS (spec §1.2–1.5, §5.4–5.7).

Every task is a few jitted programs: an *init* (prefill of the prompt into the LLM and semantic-module KV caches), a
*run* holding a ``lax.while_loop`` over a per-task *step* function, and (for audio) one batched VAE decode. The loop
state is a dict pytree (KV caches, per-sequence counters and done flags, output buffers, keys), so there is no host
round trip per step; the loop exits when every sequence is done (or a step ``limit`` is reached, which is how the
streaming generator runs K steps at a time with the very same compiled program).

Conventions:

* Requests of different lengths share a batch: prompts are right-padded with per-item lengths, budgets are per item,
  finished sequences stop changing (``active`` masks: their outputs, counts and KV-cache lengths are frozen).
* Randomness: one key per call; each row derives its own key as ``fold_in(key, request_ids[b])`` and the key of its
  k-th patch as ``fold_in(row_key, k)``. A request's output therefore does not depend on the rest of its batch
  (``request_ids`` default to the row index; pass the same id to reproduce a row alone).
* Static shapes come from length buckets (:func:`bucket`): prompt length, prompt patches, output budgets and the
  batch are padded up to a few sizes so a batch job compiles a handful of programs, not one per request.
* Token ids (``<audioPatch>``, ``<|endoftext|>``, ``<gen_audio>``) are arguments, never hard-coded.
* The loop state is donated to the ``*_run`` programs (the KV and semantic caches are updated in place, not
  copied): a state passed to ``tts_run`` / ``asr_run`` / ``edit_run`` must not be used again.
* On a device mesh (``mesh=``, with logical-axis ``rules``; params placed by
  :func:`unitok_jax.sharding.uniaudio_shardings`, e.g. by ``UniAudio.load(mesh=...)``) the very same programs run
  SPMD: the batch is split over the mesh axes the rules give ``batch`` (``data`` x ``fsdp``; the batch bucket is
  rounded up to a multiple of their size), the weights stay sharded as loaded, and the MoE layers inside the
  ``while_loop`` are expert-parallel when the rules put ``expert`` on a mesh axis of size > 1. ``mesh=None`` (the
  default) is one device, unchanged.

Where we differ from the reference on purpose (spec §9):

* batched over requests (the reference is batch 1, #1), explicit per-sequence keys (#2);
* the stop rule ``prob > stop_threshold and k > min_steps`` keeps the reference defaults (0.5, 16) but both are
  arguments (``min_steps`` may be per sequence) and ``emit_stop_patch`` (default True, as the reference) is a flag
  (#5);
* the waveform is always complete: decoding is offline with frame counts, and the streaming generator always
  flushes the last chunk, also when the budget (not the stop head) ends a sequence (#7);
* edit: text mode ends at EOS (no audio then), text and audio have separate budgets, the ``<gen_audio>`` switch is
  per sequence, an edit without audio returns zero patches (#8); history starts at zeros and the semantic cache
  continues from the source audio (#9);
* multi_gate: the ASR prefill routes the audio positions through ``audio_gate`` (``audio_gate=True``), TTS and edit
  use the text gate, as the reference (#11).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from unitok_jax import heads, llm, model, vae
from unitok_jax import sharding as shd
from unitok_jax.configs.uniaudio import TINY_BAILINGMM, tiny_config  # noqa: F401  (re-exported)
from unitok_jax.model import UniAudioConfig
from unitok_jax.shapes import BATCH_BUCKETS, DEFAULT_BUCKETS, bucket, pad_axis, pad_sequences  # noqa: F401

@dataclasses.dataclass(frozen=True)
class Sampler:
    """Flow-head sampler settings (spec §4.5). ``steps`` is static (it shapes the program), and so is whether
    ``cfg`` is 0 (no guidance: the DiT runs on the batch instead of the doubled batch); the values are data."""

    steps: int = 10
    cfg: float = 2.0
    sigma: float = 0.25
    temperature: float = 1.5
    sway: float = -1.0

    @property
    def guided(self) -> bool:
        return float(self.cfg) != 0.0


# Buckets and padding live in unitok_jax.shapes (one home for generation, sampling, data and training); the names
# stay importable from here.


class _Mesh(NamedTuple):
    """Where a generation call runs: ``mesh`` (None: the default device) and the logical-axis ``rules``."""

    mesh: Optional[jax.sharding.Mesh]
    rules: tuple

    @classmethod
    def of(cls, mesh, rules) -> "_Mesh":
        return cls(mesh, tuple(rules) if rules is not None else shd.DEFAULT_RULES)

    def batch_axes(self) -> tuple:
        if self.mesh is None:
            return ()
        t = shd.rule_target(self.rules, "batch")
        axes = (t,) if isinstance(t, str) else tuple(t or ())
        return tuple(a for a in axes if self.mesh.shape.get(a, 1) > 1)

    def batch_multiple(self) -> int:
        """Rows per batch must be a multiple of this (the product of the batch mesh axes)."""
        n = 1
        for a in self.batch_axes():
            n *= int(self.mesh.shape[a])
        return n

    def rows(self, b: int, batch_buckets) -> int:
        """The batch bucket of ``b`` rows, a multiple of the batch mesh axes."""
        bb, m = bucket(b, batch_buckets), self.batch_multiple()
        return -(-bb // m) * m

    def context(self):
        """Trace context: the mesh and rules (activations constrained, MoE expert-parallel), or nothing."""
        return contextlib.nullcontext() if self.mesh is None else shd.use_sharding(self.mesh, self.rules)

    def put(self, tree, rows: int):
        """Host inputs onto the mesh: arrays whose leading dim is ``rows`` split over the batch axes (when they
        divide it), the rest (and PRNG keys) replicated. No mesh: unchanged (jit places them)."""
        if self.mesh is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec as P

        batch = NamedSharding(self.mesh, P(self.batch_axes() or None))
        rep = NamedSharding(self.mesh, P())

        def one(x):
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.device_put(x, rep)
            x = np.asarray(x)
            split = x.ndim and x.shape[0] == rows and rows % self.batch_multiple() == 0
            return jax.device_put(x, batch if split else rep)

        return jax.tree.map(one, tree)


def _row_keys(key, request_ids):
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(request_ids)


def _patch_keys(row_keys, count):
    return jax.vmap(jax.random.fold_in)(row_keys, count)


def _knobs(sampler: Sampler, stop_threshold) -> dict:
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return {"cfg": f(sampler.cfg), "sigma": f(sampler.sigma), "temperature": f(sampler.temperature),
            "sway": f(sampler.sway), "threshold": f(stop_threshold)}


# ------------------------------------------------------------------------------------------------- loop states
# Typed loop states (pytrees). Every array has the batch (slot) axis first, except the scalars ``iter`` and
# ``knobs`` and the KV caches' ``k`` / ``v`` ([layers, B, ...], see unitok_jax.nn.cache); :func:`_slot_axis` is that
# rule, which is what lets the continuous-batching driver write a new request into any slot.


@flax.struct.dataclass
class TTSState:
    iter: jax.Array  # [] loop steps taken
    cache: dict  # LLM KV cache
    sem: dict  # semantic-module KV cache
    hidden: jax.Array  # [B, D] last LLM hidden state (the flow condition)
    history: jax.Array  # [B, p, C] previous patch
    count: jax.Array  # [B] patches emitted
    budget: jax.Array  # [B] patch caps
    min_steps: jax.Array  # [B]
    done: jax.Array  # [B]
    stopped: jax.Array  # [B] ended by the stop head
    out: jax.Array  # [B, N, p, C] emitted patches
    keys: jax.Array  # [B] row keys (fold_in(key, request_id))
    knobs: dict  # sampler values and the stop threshold (scalars)
    noise: Optional[tuple] = None  # recorded noise (init [B, N, p, C], steps [B, N, S, p, C]) or None: drawn


@flax.struct.dataclass
class ASRState:
    iter: jax.Array
    cache: dict
    logits: jax.Array  # [B, V] next-token logits
    tokens: jax.Array  # [B, M]
    n: jax.Array  # [B] tokens generated
    budget: jax.Array  # [B]
    done: jax.Array
    eos: jax.Array  # [B] ended by eos


@flax.struct.dataclass
class EditState:
    iter: jax.Array
    cache: dict
    sem: dict
    logits: jax.Array
    hidden: jax.Array
    tokens: jax.Array
    n: jax.Array
    budget_text: jax.Array
    audio: jax.Array  # [B] in the audio phase (reached <gen_audio>)
    history: jax.Array
    count: jax.Array
    budget: jax.Array
    min_steps: jax.Array
    done: jax.Array
    stopped: jax.Array
    eos: jax.Array
    out: jax.Array
    keys: jax.Array
    knobs: dict


def _slot_axis(path) -> int:
    """The batch (slot) axis of a loop-state leaf: 1 for the KV caches' ``k`` / ``v`` ([layers, B, ...]), else 0."""
    last = path[-1]
    return 1 if isinstance(last, jax.tree_util.DictKey) and last.key in ("k", "v") else 0


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(state, new, slots):
    """Write the rows of ``new`` (a state of the same task and shapes but fewer rows) into ``state`` at ``slots``
    [rows of new] (an index past the last slot drops that row: padding). Scalars (``iter``, ``knobs``) are kept."""
    def put(path, old, x):
        if old.ndim == 0:
            return old
        ax = _slot_axis(path)
        return old.at[(slice(None),) * ax + (slots,)].set(x.astype(old.dtype), mode="drop")

    return jax.tree_util.tree_map_with_path(put, state, new)


@jax.jit
def _gather_rows(tree, slots):
    return jax.tree.map(lambda x: x[slots], tree)


# ------------------------------------------------------------------------------------------------- shared pieces


def _sample_and_stop(params, cfg: UniAudioConfig, state, steps: int, guided: bool = True):
    """Next patch [B, p, C] from the last LLM hidden and the history, and the stop probability [B]. ``guided``
    (static): classifier-free guidance with the traced strength ``knobs['cfg']`` (one DiT call on the doubled
    batch); False: the conditional DiT alone on the batch (what ``Sampler.cfg == 0`` compiles to). A state with
    recorded ``noise`` (TTS) takes each row's noise of its current patch instead of drawing it."""
    kn = state.knobs
    keys = _patch_keys(state.keys, state.count)
    noise = {}
    if getattr(state, "noise", None) is not None:
        init, step = state.noise
        rows, k = jnp.arange(init.shape[0]), jnp.minimum(state.count, init.shape[1] - 1)
        noise = {"init_noise": init[rows, k], "step_noise": jnp.swapaxes(step[rows, k], 0, 1)}
    x = model.sample_patch(params, cfg, keys, state.hidden[:, None], state.history, steps=steps,
                           cfg=kn["cfg"] if guided else 0.0, sigma=kn["sigma"], temperature=kn["temperature"],
                           sway=kn["sway"], **noise)
    prob = heads.stop_probability(model.stop_logits(params, cfg, state.hidden))
    return x, prob


def _emit(state, x, is_audio, prob, emit_stop_patch: bool):
    """Stop rule and output write for the rows in audio mode; returns (stop, emit, out, count)."""
    k = state.count
    stop = is_audio & (prob > state.knobs["threshold"]) & (k > state.min_steps)
    emit = is_audio & (~stop | emit_stop_patch)
    b, n = state.out.shape[:2]
    rows, slot = jnp.arange(b), jnp.minimum(k, n - 1)
    cur = state.out[rows, slot]
    out = state.out.at[rows, slot].set(jnp.where(emit[:, None, None], x.astype(cur.dtype), cur))
    return stop, emit, out, k + emit.astype(jnp.int32)


def _while(step_fn, state, limit, free=None):
    """Run ``step_fn`` until ``state.iter == limit`` or at least ``free`` rows are done (default: all of them)."""
    free = state.done.shape[0] if free is None else free

    def cond(s):
        return (s.iter < limit) & (jnp.sum(s.done.astype(jnp.int32)) < free)

    return jax.lax.while_loop(cond, step_fn, state)


def _audio_prefix(params, cfg: UniAudioConfig, latent, patches, sem_size: int):
    """Right-padded latents [B, T, C] with ``patches`` [B] valid patches -> (pooled [B, T/p, D], semantic cache)."""
    b, t = latent.shape[:2]
    p = cfg.patch_size
    sem = vae.init_semantic_cache(cfg.vae, b, sem_size)
    valid = jnp.arange(t)[None, :] < (patches * p)[:, None]
    pooled, _, sem = model.audio_inputs(params, cfg, latent, sem, valid)
    return pooled, sem


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_latents(params, cfg: UniAudioConfig, out, count):
    """Output buffer [B, N, p, C] with ``count`` [B] patches -> waveforms [B, N * p * hop] (zero past the end)."""
    b, n, p, c = out.shape
    return vae.decode(params["audio"], cfg.vae, out.reshape(b, n * p, c), count * p)


# ------------------------------------------------------------------------------------------------- the driver


class _Job(NamedTuple):
    """A list of requests for one task, as the inputs of its ``*_init`` program: ``rows`` per request (host arrays
    [n, ...], already padded to the job's static shapes), ``pad`` the value of a padding row for each (a budget of 0
    makes a padding row done from the start), ``shared`` the inputs common to every row (key, sampler knobs) and
    ``statics`` the init's static arguments (max lengths). ``bound``: more loop steps than any request can take."""

    rows: dict
    pad: dict
    shared: dict
    statics: dict
    bound: int

    @property
    def size(self) -> int:
        return len(self.rows["lengths"])

    def batch(self, idx, rows: int, where: "_Mesh") -> dict:
        """Requests ``idx`` as a batch of ``rows`` rows (padding rows last), placed on the mesh."""
        idx = np.asarray(idx, np.int64)
        args = {k: jax.tree.map(lambda a, k=k: pad_axis(a[idx], rows, 0, self.pad.get(k, 0)), v)
                for k, v in self.rows.items()}
        return where.put({**args, **self.shared}, rows)


def _check_batching(slots, rounds) -> None:
    if slots is not None and (not isinstance(slots, (int, np.integer)) or slots < 1):
        raise ValueError(f"slots must be a positive int or None, got {slots!r}")
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")


def _drive(job: _Job, init, run, fields, *, slots: Optional[int], rounds: int, where: "_Mesh",
           batch_buckets=BATCH_BUCKETS) -> dict:
    """Run every request of ``job`` and return ``fields(state)``'s arrays per request ({name: [n, ...]}).

    Static batching (``slots`` None or >= n): one batch of all requests (the batch bucket of n rows), run until
    every row is done. Continuous batching (``slots`` < n): ``slots`` rows; the compiled loop runs up to ``rounds``
    steps, or until enough rows are done to be worth a refill (a quarter of the slots, or what is left to run),
    then the host collects the finished rows and prefills the next requests into the free slots
    (:func:`_insert`), and the loop goes on. A request's output does not depend on its slot or its neighbours (its
    randomness comes from its request id, its rows are computed independently), so both give the same results."""
    n = job.size
    if n == 0:
        raise ValueError("no requests")
    _check_batching(slots, rounds)
    static = slots is None or slots >= n
    rows = where.rows(n, batch_buckets) if static else where.rows(int(slots), None)
    pending = list(range(n))
    owner = np.full((rows,), -1, np.int64)
    results: list = [None] * n

    def take(k: int) -> list:
        got, pending[:k] = pending[:k], []
        return got

    first = take(min(rows, n))
    state = init(job.batch(first, rows, where))
    owner[: len(first)] = first
    refill = max(1, rows // 4)
    it = 0
    while True:
        idle = int((owner < 0).sum())
        if pending:
            free, steps = min(rows, idle + min(len(pending), refill)), min(rounds, job.bound)
        else:
            free, steps = rows, job.bound
        state = run(state, jnp.int32(it + steps), jnp.int32(free))
        it = int(state.iter)
        done = np.asarray(state.done)
        fin = np.flatnonzero(done & (owner >= 0))
        if len(fin):
            idx = pad_axis(fin, bucket(len(fin), batch_buckets), 0)
            vals = {k: np.asarray(v)[: len(fin)] for k, v in _gather_rows(fields(state), jnp.asarray(idx)).items()}
            for j, s in enumerate(fin):
                results[owner[s]] = {k: v[j] for k, v in vals.items()}
            owner[fin] = -1
        if not pending:
            if (owner < 0).all():
                break
            continue
        free_slots = np.flatnonzero(owner < 0)
        if len(free_slots):
            new = take(min(len(free_slots), len(pending)))
            kb = min(where.rows(len(new), batch_buckets), rows)
            fresh = init(job.batch(new, kb, where))
            dest = np.full((kb,), rows, np.int32)
            dest[: len(new)] = free_slots[: len(new)]
            state = _insert(state, fresh, where.put(dest, kb))
            owner[free_slots[: len(new)]] = new
    return {k: np.stack([r[k] for r in results]) for k in results[0]}


def _python_run(step):
    """A ``run`` for :func:`_drive` that drives the jitted ``step`` from a host loop (one dispatch per step)."""
    def run(state, limit, free):
        while int(state.iter) < int(limit) and int(jnp.sum(state.done)) < int(free):
            state = step(state)
        return state

    return run


def _decode_all(params, cfg: UniAudioConfig, latents, counts, rows: int, where: "_Mesh") -> np.ndarray:
    """Waveforms of host latents [n, N, p, C] (``counts`` patches each), decoded ``rows`` at a time (one program)."""
    n = len(latents)
    waves = []
    for i in range(0, n, rows):
        lat, cnt = latents[i:i + rows], counts[i:i + rows]
        args = where.put((pad_axis(lat, rows, 0), pad_axis(cnt, rows, 0)), rows)
        waves.append(np.asarray(decode_latents(params, cfg, *args))[: len(lat)])
    return np.concatenate(waves)


# ------------------------------------------------------------------------------------------------- TTS


@functools.partial(jax.jit, static_argnames=("cfg", "max_patches"))
def tts_init(params, cfg: UniAudioConfig, ids, lengths, prompt, prompt_patches, budgets, key, request_ids,
             min_steps, knobs, noise=None, *, max_patches: int) -> TTSState:
    """Prefill: text [B, S] (``lengths``, ending with ``<audio>``) followed by each item's pooled prompt patches
    (``prompt`` [B, Tp, C], ``prompt_patches`` [B]); returns the loop state. ``noise``: optional recorded noise per
    row and patch (init [B, N, p, C], steps [B, N, S, p, C]) used instead of the drawn noise."""
    b, s = ids.shape
    tp, c = prompt.shape[1:]
    p = cfg.patch_size
    if tp % p:
        raise ValueError(f"prompt latents have {tp} frames, not a multiple of patch_size={p}")
    pp = tp // p
    pooled, sem = _audio_prefix(params, cfg, prompt, prompt_patches, tp + max_patches * p)
    text = model.embed_tokens(params, cfg, ids)
    embeds = jnp.concatenate([text, jnp.zeros((b, pp, text.shape[-1]), text.dtype)], axis=1)
    embeds = model.splice_audio(embeds, pooled, lengths)
    lm = model.llm_module(cfg)
    cache = llm.init_cache(cfg.llm, b, s + pp + max_patches)
    _, hidden, cache = llm.prefill(lm, model.llm_vars(params), cache, inputs_embeds=embeds,
                                   lengths=lengths + prompt_patches)
    last = jnp.take_along_axis(prompt.reshape(b, pp, p, c), jnp.maximum(prompt_patches - 1, 0)[:, None, None, None],
                               axis=1)[:, 0]
    history = jnp.where((prompt_patches > 0)[:, None, None], last, 0.0).astype(jnp.float32)
    budgets = jnp.minimum(budgets, max_patches).astype(jnp.int32)
    return TTSState(
        iter=jnp.zeros((), jnp.int32), cache=cache, sem=sem, hidden=hidden, history=history,
        count=jnp.zeros((b,), jnp.int32), budget=budgets,
        min_steps=jnp.broadcast_to(jnp.asarray(min_steps, jnp.int32), (b,)), done=budgets <= 0,
        stopped=jnp.zeros((b,), bool), out=jnp.zeros((b, max_patches, p, c), jnp.float32),
        keys=_row_keys(key, request_ids), knobs=knobs,
        noise=None if noise is None else tuple(jnp.asarray(x, jnp.float32) for x in noise))


def _tts_step(params, cfg: UniAudioConfig, state: TTSState, steps: int, emit_stop_patch: bool,
              guided: bool = True) -> TTSState:
    active = ~state.done
    x, prob = _sample_and_stop(params, cfg, state, steps, guided)
    stop, emit, out, count = _emit(state, x, active, prob, emit_stop_patch)
    done = state.done | stop | (active & (count >= state.budget))
    cont = active & ~done
    p = cfg.patch_size
    valid = jnp.broadcast_to(cont[:, None], cont.shape + (p,))
    pooled, _, sem = model.audio_inputs(params, cfg, x, state.sem, valid)
    _, hidden, cache = llm.decode_step(model.llm_module(cfg), model.llm_vars(params), state.cache,
                                       inputs_embeds=pooled, active=cont)
    return state.replace(
        iter=state.iter + 1, cache=cache, sem=sem, hidden=jnp.where(cont[:, None], hidden, state.hidden),
        history=jnp.where(emit[:, None, None], x, state.history), count=count, done=done,
        stopped=state.stopped | stop, out=out)


tts_step = jax.jit(_tts_step, static_argnames=("cfg", "steps", "emit_stop_patch", "guided"))
tts_step.__doc__ = """One TTS step for every active row (jitted; the body of :func:`tts_run`'s loop): LLM hidden ->
flow sample (CFG in the same call) -> stop probability -> emit -> semantic module + pooling -> LLM decode step."""


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "emit_stop_patch", "guided"),
                   donate_argnames=("state",))
def tts_run(params, cfg: UniAudioConfig, state: TTSState, limit, free=None, *, steps: int,
            emit_stop_patch: bool = True, guided: bool = True) -> TTSState:
    """``lax.while_loop`` of :func:`tts_step` until ``state.iter == limit`` or ``free`` rows (default: all) are
    done (both traced). ``guided=False``: no classifier-free guidance (one DiT call per flow step on the batch, not
    the doubled one)."""
    return _while(lambda s: _tts_step(params, cfg, s, steps, emit_stop_patch, guided), state, limit, free)


class TTSResult(NamedTuple):
    latents: np.ndarray  # [B, N, p, C] (zeros past each row's count)
    counts: np.ndarray  # [B] patches generated
    waves: Optional[np.ndarray]  # [B, N * p * hop] (zeros past counts * p * hop)
    stopped: np.ndarray  # [B] True where the stop head ended the row (False: budget)


def _tts_job(cfg, ids, lengths, prompt, prompt_patches, budgets, key, request_ids, sampler, min_steps,
             stop_threshold, max_patches, buckets, noise=None) -> _Job:
    ids = np.asarray(ids, np.int32)
    b = ids.shape[0]
    p = cfg.patch_size
    prompt = np.asarray(prompt, np.float32)
    lengths = np.asarray(lengths, np.int32)
    prompt_patches = np.asarray(prompt_patches, np.int32)
    budgets = np.asarray(budgets, np.int32)
    if prompt.shape[1] < int(prompt_patches.max(initial=0)) * p:
        raise ValueError(f"prompt has {prompt.shape[1]} frames, fewer than max(prompt_patches) * {p}")
    request_ids = np.arange(b, dtype=np.int32) if request_ids is None else np.asarray(request_ids, np.int32)
    n = bucket(max_patches if max_patches is not None else max(int(budgets.max(initial=1)), 1), buckets)
    s = bucket(ids.shape[1], buckets)
    pp = bucket(max(int(prompt_patches.max(initial=1)), 1), buckets)
    prompt = prompt[:, : pp * p] if prompt.shape[1] > pp * p else prompt
    rows = {"ids": pad_axis(ids, s, 1), "lengths": lengths, "prompt": pad_axis(prompt, pp * p, 1),
            "prompt_patches": prompt_patches, "budgets": budgets, "request_ids": request_ids,
            "min_steps": np.broadcast_to(np.asarray(min_steps, np.int32), (b,)).copy()}
    if noise is not None:
        init, steps = (np.asarray(x, np.float32) for x in noise)
        if init.shape[:2] != (b, init.shape[1]) or init.shape[1] > n or steps.shape[:2] != init.shape[:2]:
            raise ValueError(f"noise: init [B, <= {n}, p, C] and steps [B, same, S, p, C] expected, got "
                             f"{init.shape} / {steps.shape}")
        rows["noise"] = (pad_axis(init, n, 1), pad_axis(steps, n, 1))
    return _Job(rows=rows, pad={"lengths": 1}, shared={"key": key, "knobs": _knobs(sampler, stop_threshold)},
                statics={"max_patches": n}, bound=n + 1)


def tts(params, cfg: UniAudioConfig, ids, lengths, prompt, prompt_patches, budgets, key, *,
        request_ids=None, sampler: Sampler = Sampler(), min_steps=16, stop_threshold: float = 0.5,
        emit_stop_patch: bool = True, max_patches: Optional[int] = None, buckets=DEFAULT_BUCKETS,
        batch_buckets=BATCH_BUCKETS, decode: bool = True, mode: str = "compiled", mesh=None,
        rules=None, slots: Optional[int] = None, rounds: int = 16, noise=None) -> TTSResult:
    """Batched TTS with a voice prompt (spec §1.3, §5.5).

    ``ids`` [B, S] right-padded text ids with ``lengths`` [B] (each ending with ``<audio>``); ``prompt`` [B, Tp, C]
    right-padded prompt latents with ``prompt_patches`` [B] whole patches each (0 = no voice prompt: history starts at
    zeros); ``budgets`` [B] patch caps (spec §5.5 step 2 / §9 #6 are the caller's formula); ``min_steps`` (int or [B])
    and ``stop_threshold``: a row stops after emitting patch k when ``prob > stop_threshold and k > min_steps``.
    ``slots``: with fewer slots than requests, continuous batching (:func:`_drive`: ``slots`` rows, the host refills
    finished rows every ``rounds`` loop steps at most); the output is the same. ``noise``: recorded sampler noise
    per request and patch, (init [B, N, p, C], steps [B, N, steps, p, C]), instead of drawn noise (parity with the
    reference). ``mode="python"`` drives the same jitted step from a host loop (one dispatch per step, the
    reference's way; for tests and the benchmark). Shapes are padded to ``buckets``; results are trimmed to B rows.
    ``mesh`` / ``rules``: run SPMD on a device mesh (module docstring)."""
    if mode not in ("compiled", "python"):
        raise ValueError(f"mode must be 'compiled' or 'python', got {mode!r}")
    where = _Mesh.of(mesh, rules)
    job = _tts_job(cfg, ids, lengths, prompt, prompt_patches, budgets, key, request_ids, sampler, min_steps,
                   stop_threshold, max_patches, buckets, noise)
    static = dict(steps=sampler.steps, emit_stop_patch=emit_stop_patch, guided=sampler.guided)
    init = lambda a: tts_init(params, cfg, **a, **job.statics)  # noqa: E731
    if mode == "compiled":
        run = lambda s, limit, free: tts_run(params, cfg, s, limit, free, **static)  # noqa: E731
    else:
        run = _python_run(lambda s: tts_step(params, cfg, s, **static))
    with where.context():
        r = _drive(job, init, run, lambda s: {"out": s.out, "count": s.count, "stopped": s.stopped},
                   slots=slots, rounds=rounds, where=where, batch_buckets=batch_buckets)
        rows = where.rows(job.size, batch_buckets) if slots is None else where.rows(min(slots, job.size), None)
        waves = _decode_all(params, cfg, r["out"], r["count"], rows, where) if decode else None
    return TTSResult(r["out"], r["count"], waves, r["stopped"])


class StreamChunk(NamedTuple):
    audio: list  # per row: new samples (np.float32, possibly empty)
    new_patches: np.ndarray  # [B] patches decoded in this chunk
    done: np.ndarray  # [B] rows finished (their audio is complete)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "steps", "emit_stop_patch", "guided"),
                   donate_argnames=("state", "stream"))
def tts_stream_run(params, cfg: UniAudioConfig, state: TTSState, stream: vae.StreamState, sent, limit, *,
                   chunk: int, steps: int, emit_stop_patch: bool = True, guided: bool = True):
    """One streaming chunk, compiled once for a whole stream: the TTS loop up to ``limit`` steps (``chunk`` more),
    then the VAE streaming decode of every row's new patches (``sent`` [B] patches already decoded) in one batched
    call with per-row valid lengths, first and last flags as data (:func:`unitok_jax.vae.decode_stream_rows`).
    Returns (state, stream, sent, samples [B, chunk * p * hop + overlap], start [B], stop [B])."""
    was_done = state.done
    state = _while(lambda s: _tts_step(params, cfg, s, steps, emit_stop_patch, guided), state, limit)
    b, n, p, c = state.out.shape
    padded = jnp.pad(state.out, ((0, 0), (0, chunk), (0, 0), (0, 0)))
    new = jax.vmap(lambda o, s: jax.lax.dynamic_slice_in_dim(o, s, chunk, 0))(padded, sent)  # [B, chunk, p, C]
    y, start, stop, stream = vae.decode_stream_rows(
        params["audio"], cfg.vae, new.reshape(b, chunk * p, c), (state.count - sent) * p, sent > 0,
        state.done & ~was_done, stream)
    return state, stream, state.count, y, start, stop


def tts_stream(params, cfg: UniAudioConfig, ids, lengths, prompt, prompt_patches, budgets, key, *,
               chunk_patches: int = 4, request_ids=None, sampler: Sampler = Sampler(), min_steps=16,
               stop_threshold: float = 0.5, emit_stop_patch: bool = True, max_patches: Optional[int] = None,
               buckets=DEFAULT_BUCKETS, batch_buckets=BATCH_BUCKETS, mesh=None,
               rules=None) -> Iterator[StreamChunk]:
    """Streaming TTS: the loop of :func:`tts` (same init, same step) runs ``chunk_patches`` steps at a time and the
    new patches of all rows are decoded in the same compiled program (:func:`tts_stream_run`: one program for the
    whole stream, whatever the rows' lengths; only the new audio comes back to the host). Per row, the
    concatenated audio equals :func:`tts`'s waveform (same key) up to float rounding; the last chunk of a row is
    always flushed, also when the budget ended it (the reference loses the tail then, spec §9 #7)."""
    where = _Mesh.of(mesh, rules)
    job = _tts_job(cfg, ids, lengths, prompt, prompt_patches, budgets, key, request_ids, sampler, min_steps,
                   stop_threshold, max_patches, buckets)
    b, n = job.size, job.statics["max_patches"]
    k = int(chunk_patches)
    if k < 1:
        raise ValueError(f"chunk_patches must be >= 1, got {chunk_patches}")
    p = cfg.patch_size
    rows = where.rows(b, batch_buckets)
    with where.context():
        state = tts_init(params, cfg, **job.batch(np.arange(b), rows, where), **job.statics)
        stream = where.put(vae.init_stream_state(cfg.vae, rows, (n + k) * p, k * p, rows=True), rows)
        sent = where.put(jnp.zeros((rows,), jnp.int32), rows)
    finished = np.asarray(state.done)[:b].copy()
    limit, prev = 0, np.zeros((b,), np.int32)
    static = dict(chunk=k, steps=sampler.steps, emit_stop_patch=emit_stop_patch, guided=sampler.guided)
    while not finished.all():
        limit += k
        with where.context():
            state, stream, sent, y, start, stop = tts_stream_run(params, cfg, state, stream, sent, jnp.int32(limit),
                                                                 **static)
        y, start, stop, count = (np.asarray(x)[:b] for x in (y, start, stop, sent))
        finished = finished | np.asarray(state.done)[:b]
        yield StreamChunk([y[r, start[r]:stop[r]] for r in range(b)], (count - prev).astype(np.int32),
                          finished.copy())
        prev = count


# ------------------------------------------------------------------------------------------------- text prefill


def _prefill_with_audio(params, cfg, ids, lengths, audio, audio_patches, audio_patch_id, audio_gate, cache_size,
                        sem_size):
    s = ids.shape[1]
    pooled, sem = _audio_prefix(params, cfg, audio, audio_patches, sem_size)
    mask = (ids == audio_patch_id) & (jnp.arange(s)[None, :] < lengths[:, None])
    embeds = model.splice_by_mask(model.embed_tokens(params, cfg, ids), pooled, mask)
    cache = llm.init_cache(cfg.llm, ids.shape[0], cache_size)
    logits, hidden, cache = llm.prefill(model.llm_module(cfg), model.llm_vars(params), cache, inputs_embeds=embeds,
                                        lengths=lengths, audio_mask=mask if audio_gate else None)
    return logits, hidden, cache, sem


def _audio_job(ids, lengths, audio, audio_patches, pad_id, buckets, p) -> tuple[dict, int]:
    """Per-request prefill inputs of ASR / edit (ids padded to their bucket, audio to its patch bucket)."""
    ids = np.asarray(ids, np.int32)
    audio = np.asarray(audio, np.float32)
    audio_patches = np.asarray(audio_patches, np.int32)
    s = bucket(ids.shape[1], buckets)
    tp = bucket(max(int(audio_patches.max(initial=1)), 1), buckets) * p
    return {"ids": pad_axis(ids, s, 1, pad_id), "lengths": np.asarray(lengths, np.int32),
            "audio": pad_axis(audio[:, :tp], tp, 1), "audio_patches": audio_patches}, ids.shape[0]


# ------------------------------------------------------------------------------------------------- ASR


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "audio_patch_id", "audio_gate"))
def asr_init(params, cfg: UniAudioConfig, ids, lengths, audio, audio_patches, budgets, *, max_new_tokens: int,
             audio_patch_id: int, audio_gate: bool = True) -> ASRState:
    b, s = ids.shape
    logits, _, cache, _ = _prefill_with_audio(params, cfg, ids, lengths, audio, audio_patches, audio_patch_id,
                                              audio_gate, s + max_new_tokens, audio.shape[1])
    budgets = jnp.minimum(budgets, max_new_tokens).astype(jnp.int32)
    return ASRState(iter=jnp.zeros((), jnp.int32), cache=cache, logits=logits,
                    tokens=jnp.zeros((b, max_new_tokens), jnp.int32), n=jnp.zeros((b,), jnp.int32),
                    budget=budgets, done=budgets <= 0, eos=jnp.zeros((b,), bool))


def _asr_step(params, cfg: UniAudioConfig, state: ASRState, eos_id: int, pad_id: int) -> ASRState:
    active = ~state.done
    tok = llm.pick_tokens(state.logits)
    b, m = state.tokens.shape
    rows, slot = jnp.arange(b), jnp.minimum(state.n, m - 1)
    tokens = state.tokens.at[rows, slot].set(jnp.where(active, tok, state.tokens[rows, slot]))
    n = state.n + active.astype(jnp.int32)
    eos = active & (tok == eos_id)
    done = state.done | eos | (active & (n >= state.budget))
    feed = active & ~done
    logits, _, cache = llm.decode_step(model.llm_module(cfg), model.llm_vars(params), state.cache,
                                       input_ids=jnp.where(feed, tok, pad_id), active=feed)
    return state.replace(iter=state.iter + 1, cache=cache, logits=jnp.where(feed[:, None], logits, state.logits),
                         tokens=tokens, n=n, done=done, eos=state.eos | eos)


asr_step = jax.jit(_asr_step, static_argnames=("cfg", "eos_id", "pad_id"))


@functools.partial(jax.jit, static_argnames=("cfg", "eos_id", "pad_id"), donate_argnames=("state",))
def asr_run(params, cfg: UniAudioConfig, state: ASRState, limit, free=None, *, eos_id: int,
            pad_id: int = 0) -> ASRState:
    return _while(lambda s: _asr_step(params, cfg, s, eos_id, pad_id), state, limit, free)


class TextResult(NamedTuple):
    tokens: np.ndarray  # [B, M] generated ids (the eos included; pad_id past n)
    n: np.ndarray  # [B] tokens generated
    eos: np.ndarray  # [B] ended by eos (False: budget)


def asr(params, cfg: UniAudioConfig, ids, lengths, audio, audio_patches, key=None, *, eos_id: int,
        audio_patch_id: int, max_new_tokens: int = 128, budgets=None, audio_gate: bool = True, pad_id: int = 0,
        buckets=DEFAULT_BUCKETS, batch_buckets=BATCH_BUCKETS, mode: str = "compiled", mesh=None,
        rules=None, slots: Optional[int] = None, rounds: int = 16) -> TextResult:
    """Batched greedy ASR (spec §1.2, §5.4). ``ids`` [B, S] right-padded full prompts (``lengths``) holding
    ``audio_patches[b]`` ``<audioPatch>`` ids each, replaced in order by the pooled patches of ``audio`` [B, T, C]
    (right-padded latents). Decoding stops per row at ``eos_id`` or after ``budgets[b]`` (default
    ``max_new_tokens``) tokens. ``audio_gate``: route the audio positions of the prefill through multi_gate's
    ``audio_gate`` (the reference's ASR path, spec §9 #11). ``key`` is unused (greedy). ``mesh`` / ``rules`` /
    ``slots`` / ``rounds``: as :func:`tts`."""
    del key
    if mode not in ("compiled", "python"):
        raise ValueError(f"mode must be 'compiled' or 'python', got {mode!r}")
    where = _Mesh.of(mesh, rules)
    rows, b = _audio_job(ids, lengths, audio, audio_patches, pad_id, buckets, cfg.patch_size)
    rows["budgets"] = np.full((b,), max_new_tokens, np.int32) if budgets is None else np.asarray(budgets, np.int32)
    m = bucket(max(int(rows["budgets"].max(initial=1)), 1), buckets)
    job = _Job(rows=rows, pad={"ids": pad_id, "lengths": 1}, shared={},
               statics=dict(max_new_tokens=m, audio_patch_id=int(audio_patch_id), audio_gate=audio_gate), bound=m + 1)
    static = dict(eos_id=int(eos_id), pad_id=int(pad_id))
    init = lambda a: asr_init(params, cfg, **a, **job.statics)  # noqa: E731
    if mode == "compiled":
        run = lambda s, limit, free: asr_run(params, cfg, s, limit, free, **static)  # noqa: E731
    else:
        run = _python_run(lambda s: asr_step(params, cfg, s, **static))
    with where.context():
        r = _drive(job, init, run, lambda s: {"tokens": s.tokens, "n": s.n, "eos": s.eos}, slots=slots,
                   rounds=rounds, where=where, batch_buckets=batch_buckets)
    tokens = np.where(np.arange(r["tokens"].shape[1])[None] < r["n"][:, None], r["tokens"], pad_id)
    return TextResult(tokens, r["n"], r["eos"])


# ------------------------------------------------------------------------------------------------- edit


@functools.partial(jax.jit, static_argnames=("cfg", "max_text", "max_patches", "audio_patch_id"))
def edit_init(params, cfg: UniAudioConfig, ids, lengths, audio, audio_patches, text_budgets, audio_budgets, key,
              request_ids, min_steps, knobs, *, max_text: int, max_patches: int, audio_patch_id: int) -> EditState:
    """Prefill of the edit prompt (source audio spliced at ``<audioPatch>``, text gate, semantic cache over the
    source audio) and the loop state: text phase first, ``audio`` flags per row."""
    b, s = ids.shape
    t, c = audio.shape[1:]
    p = cfg.patch_size
    logits, hidden, cache, sem = _prefill_with_audio(params, cfg, ids, lengths, audio, audio_patches,
                                                     audio_patch_id, False, s + max_text + max_patches,
                                                     t + max_patches * p)
    text_budgets = jnp.minimum(text_budgets, max_text).astype(jnp.int32)
    return EditState(
        iter=jnp.zeros((), jnp.int32), cache=cache, sem=sem, logits=logits, hidden=hidden,
        tokens=jnp.zeros((b, max_text), jnp.int32), n=jnp.zeros((b,), jnp.int32), budget_text=text_budgets,
        audio=jnp.zeros((b,), bool), history=jnp.zeros((b, p, c), jnp.float32), count=jnp.zeros((b,), jnp.int32),
        budget=jnp.minimum(audio_budgets, max_patches).astype(jnp.int32),
        min_steps=jnp.broadcast_to(jnp.asarray(min_steps, jnp.int32), (b,)), done=text_budgets <= 0,
        stopped=jnp.zeros((b,), bool), eos=jnp.zeros((b,), bool), out=jnp.zeros((b, max_patches, p, c), jnp.float32),
        keys=_row_keys(key, request_ids), knobs=knobs)


def _edit_step(params, cfg: UniAudioConfig, state: EditState, steps, emit_stop_patch, eos_id, gen_audio_id, pad_id,
               guided=True) -> EditState:
    active = ~state.done
    is_text = active & ~state.audio
    is_audio = active & state.audio
    p = cfg.patch_size
    # text phase: greedy token, appended to the text (the <gen_audio> token included) and fed back
    tok = llm.pick_tokens(state.logits)
    b, m = state.tokens.shape
    rows, slot = jnp.arange(b), jnp.minimum(state.n, m - 1)
    tokens = state.tokens.at[rows, slot].set(jnp.where(is_text, tok, state.tokens[rows, slot]))
    n = state.n + is_text.astype(jnp.int32)
    to_audio = is_text & (tok == gen_audio_id)
    eos = is_text & (tok == eos_id)
    text_end = eos | (is_text & ~to_audio & (n >= state.budget_text)) | (to_audio & (state.budget <= 0))
    # audio phase (the flow head only runs when some row is in it)
    x, prob = jax.lax.cond(
        jnp.any(is_audio),
        lambda: _sample_and_stop(params, cfg, state, steps, guided),
        lambda: (jnp.zeros_like(state.history), jnp.zeros((b,), jnp.float32)),
    )
    stop, emit, out, count = _emit(state, x, is_audio, prob, emit_stop_patch)
    audio_end = stop | (is_audio & (count >= state.budget))
    done = state.done | text_end | audio_end
    feed_text = is_text & ~text_end
    feed_audio = is_audio & ~audio_end
    pooled, _, sem = model.audio_inputs(params, cfg, x, state.sem,
                                        jnp.broadcast_to(feed_audio[:, None], feed_audio.shape + (p,)))
    tok_emb = model.embed_tokens(params, cfg, jnp.where(feed_text, tok, pad_id)[:, None])
    inp = jnp.where(feed_text[:, None, None], tok_emb, pooled.astype(tok_emb.dtype))
    feed = feed_text | feed_audio
    logits, hidden, cache = llm.decode_step(model.llm_module(cfg), model.llm_vars(params), state.cache,
                                            inputs_embeds=inp, active=feed)
    return state.replace(
        iter=state.iter + 1, cache=cache, sem=sem, logits=jnp.where(feed[:, None], logits, state.logits),
        hidden=jnp.where(feed[:, None], hidden, state.hidden), tokens=tokens, n=n, audio=state.audio | to_audio,
        history=jnp.where(emit[:, None, None], x, state.history), count=count, out=out, done=done,
        stopped=state.stopped | stop, eos=state.eos | eos)


_EDIT_STATIC = ("cfg", "steps", "emit_stop_patch", "eos_id", "gen_audio_id", "pad_id", "guided")
edit_step = jax.jit(_edit_step, static_argnames=_EDIT_STATIC)


@functools.partial(jax.jit, static_argnames=_EDIT_STATIC, donate_argnames=("state",))
def edit_run(params, cfg: UniAudioConfig, state: EditState, limit, free=None, *, steps, emit_stop_patch, eos_id,
             gen_audio_id, pad_id=0, guided=True) -> EditState:
    return _while(
        lambda s: _edit_step(params, cfg, s, steps, emit_stop_patch, eos_id, gen_audio_id, pad_id, guided),
        state, limit, free)


class EditResult(NamedTuple):
    tokens: np.ndarray  # [B, M] text ids (up to and including <gen_audio> / eos; pad_id past n)
    n: np.ndarray  # [B] text tokens
    switched: np.ndarray  # [B] reached <gen_audio> (audio phase)
    latents: np.ndarray  # [B, N, p, C]
    counts: np.ndarray  # [B] audio patches
    waves: Optional[np.ndarray]  # [B, N * p * hop]
    stopped: np.ndarray  # [B] audio ended by the stop head
    eos: np.ndarray  # [B] text ended by eos (no audio)


def edit(params, cfg: UniAudioConfig, ids, lengths, audio, audio_patches, key, *, eos_id: int, gen_audio_id: int,
         audio_patch_id: int, max_text_tokens: int = 128, max_patches: int = 256, text_budgets=None,
         audio_budgets=None, request_ids=None, sampler: Sampler = Sampler(), min_steps=16,
         stop_threshold: float = 0.5, emit_stop_patch: bool = True, pad_id: int = 0, buckets=DEFAULT_BUCKETS,
         batch_buckets=BATCH_BUCKETS, decode: bool = True, mode: str = "compiled", mesh=None,
         rules=None, slots: Optional[int] = None, rounds: int = 16) -> EditResult:
    """Batched free-form editing (spec §1.4, §5.6): greedy text per row until ``gen_audio_id`` (then that row's
    audio phase: flow patches with history starting at zeros and the semantic cache continuing from the source
    audio, stop rule as :func:`tts`) or ``eos_id`` (text only). ``ids`` [B, S] right-padded edit prompts with
    ``audio_patches[b]`` ``<audioPatch>`` ids, ``audio`` [B, T, C] the source latents. Text and audio have separate
    budgets (``text_budgets`` / ``audio_budgets`` [B], default the maxima); the reference shares one
    ``max(2.5 S, 100)`` step budget and has no EOS stop (spec §9 #8). ``mesh`` / ``rules`` / ``slots`` /
    ``rounds``: as :func:`tts`."""
    if mode not in ("compiled", "python"):
        raise ValueError(f"mode must be 'compiled' or 'python', got {mode!r}")
    where = _Mesh.of(mesh, rules)
    rows, b = _audio_job(ids, lengths, audio, audio_patches, pad_id, buckets, cfg.patch_size)
    tb = np.full((b,), max_text_tokens, np.int32) if text_budgets is None else np.asarray(text_budgets, np.int32)
    ab = np.full((b,), max_patches, np.int32) if audio_budgets is None else np.asarray(audio_budgets, np.int32)
    m = bucket(max(int(tb.max(initial=1)), 1), buckets)
    nb = bucket(max(int(ab.max(initial=1)), 1), buckets)
    request_ids = np.arange(b, dtype=np.int32) if request_ids is None else np.asarray(request_ids, np.int32)
    rows.update(text_budgets=tb, audio_budgets=ab, request_ids=request_ids,
                min_steps=np.broadcast_to(np.asarray(min_steps, np.int32), (b,)).copy())
    job = _Job(rows=rows, pad={"ids": pad_id, "lengths": 1},
               shared={"key": key, "knobs": _knobs(sampler, stop_threshold)},
               statics=dict(max_text=m, max_patches=nb, audio_patch_id=int(audio_patch_id)), bound=m + nb + 1)
    static = dict(steps=sampler.steps, emit_stop_patch=emit_stop_patch, eos_id=int(eos_id),
                  gen_audio_id=int(gen_audio_id), pad_id=int(pad_id), guided=sampler.guided)
    init = lambda a: edit_init(params, cfg, **a, **job.statics)  # noqa: E731
    if mode == "compiled":
        run = lambda s, limit, free: edit_run(params, cfg, s, limit, free, **static)  # noqa: E731
    else:
        run = _python_run(lambda s: edit_step(params, cfg, s, **static))
    fields = lambda s: {"tokens": s.tokens, "n": s.n, "audio": s.audio, "out": s.out, "count": s.count,  # noqa: E731
                        "stopped": s.stopped, "eos": s.eos}
    with where.context():
        r = _drive(job, init, run, fields, slots=slots, rounds=rounds, where=where, batch_buckets=batch_buckets)
        rows_n = where.rows(b, batch_buckets) if slots is None else where.rows(min(slots, b), None)
        waves = _decode_all(params, cfg, r["out"], r["count"], rows_n, where) if decode else None
    tokens = np.where(np.arange(r["tokens"].shape[1])[None] < r["n"][:, None], r["tokens"], pad_id)
    return EditResult(tokens, r["n"], r["audio"], r["out"], r["count"], waves, r["stopped"], r["eos"])
