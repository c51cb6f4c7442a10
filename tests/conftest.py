"""Shared test setup: float32 matmuls at full precision, a persistent compilation cache for the session, and access
to the reference fixtures."""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import shutil
import tempfile

# One persistent XLA compilation cache for this test session, in a fresh temporary folder (so nothing carries over
# between sessions): the many train.py / sample.py subprocesses (they inherit the environment) and the test modules
# that jit the same tiny programs load an executable compiled once instead of compiling it again. A cached
# executable is the very same program, so results are unchanged. Set JAX_COMPILATION_CACHE_DIR to choose the folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="unitok_jax_test_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# LLVM at -O0 for every program of the session (subprocesses inherit it through XLA_FLAGS; add flags with
# xla_flags()): the suite compiles hundreds of tiny programs whose run time is small next to their compile time, and
# -O0 compiles them about a third faster. It changes code generation only, not the math (no fast-math either way;
# matmuls are library calls at any level), so parity figures are unchanged. UNITOK_TEST_XLA_OPT=1 turns it off.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if os.environ.get("UNITOK_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()


def xla_flags(*extra: str) -> str:
    """This session's XLA_FLAGS plus ``extra`` (for a subprocess's environment: e.g. a simulated device count)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


import jax  # noqa: E402  (after the cache settings, which jax reads when it is imported)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(
    os.environ.get("UNITOK_REFERENCE_FIXTURES", str(REPO.parent / "shared" / "fixtures" / "reference"))
)
SHARED_DATA = REPO.parent / "shared" / "data"


SPEECH = SHARED_DATA / "librispeech-1089-134686-0000.flac"  # 10.4 s of LibriSpeech, 16 kHz


def speech_clip(folder, seconds: float = 1.0, start: float = 0.5) -> str:
    """``seconds`` of :data:`SPEECH` from ``start`` written as a WAV in ``folder``; its path. Prompts for the tiny
    test models: their VAE runs at 400 frames/s, so the whole utterance would be 4175 frames (an 8192-frame bucket
    and an 835-patch prefill), where a second shows the same behaviour."""
    import soundfile as sf

    wave, sr = sf.read(SPEECH, dtype="float32")
    path = pathlib.Path(folder) / f"speech_{seconds:g}s_at_{start:g}.wav"
    sf.write(path, wave[int(start * sr): int((start + seconds) * sr)], sr)
    return str(path)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| (the parity metric)."""
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        raise FileNotFoundError(
            f"reference fixtures not found at {FIXTURES}; set UNITOK_REFERENCE_FIXTURES to the fixture folder"
        )
    return FIXTURES


def load_fixture(name: str):
    """(config dict, npz arrays) for fixture ``name`` (e.g. 'audio_vae')."""
    with open(FIXTURES / f"{name}.config.json") as f:
        cfg = json.load(f)
    return cfg, dict(np.load(FIXTURES / f"{name}.npz"))


def tiny_uniaudio(texts, vocab_size: int = 320, *, seed: int = 0, normal_scale=None):
    """(tokenizer, UniAudioConfig, params) of the tiny full model (``generate.TINY_BAILINGMM``) with a BPE trained on
    ``texts`` and the vocabulary sized to it. Params from ``model.init_params`` (jitted), or with ``normal_scale``
    i.i.d. normal numpy arrays of that scale (nothing compiled)."""
    import copy

    from unitok_jax import generate, model, text

    tok = text.train_tokenizer(list(texts), vocab_size=vocab_size)
    conf = copy.deepcopy(generate.TINY_BAILINGMM)
    conf["llm_config"]["vocab_size"] = tok.vocab_size
    cfg = model.UniAudioConfig.from_bailingmm(conf)
    if normal_scale is None:
        params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    else:
        shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(seed))
        rng = np.random.default_rng(seed)
        params = jax.tree.map(lambda s: (normal_scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    return tok, cfg, params


def save_tiny_checkpoint(path, tok, cfg, params) -> str:
    """A full checkpoint folder (params + tokenizer) that ``sample.py`` / ``UniAudio.load`` read."""
    from unitok_jax.convert import Checkpoint, save

    save(Checkpoint({"uniaudio": cfg}, {"uniaudio": jax.tree.map(np.asarray, params)}), str(path))
    tok.save(str(path))
    return str(path)


# The slowest modules first (setup + call times summed per module, `pytest --durations=0`, 2026-12-07): ``make test``
# runs modules whole on two workers (``--dist loadfile``) in collection order (``--no-loadscope-reorder``: xdist's
# default reorders modules by their number of tests, which put most of these last), so starting the long ones first
# leaves short modules for the end, where they fill both workers, instead of one long module running alone at the
# tail (longest-processing-time-first). The rest keep their order.
SLOW_FIRST = ("test_sample_mesh.py", "test_demo.py", "test_train_lm_cli.py", "test_preemption.py",
              "test_lm_sharded.py", "test_generate.py", "test_train_s2.py", "test_lm_lean.py", "test_lm_packing.py",
              "test_train_cli.py", "test_generate_continuous.py", "test_sample_tasks.py", "test_sharding.py", "test_convert_streaming.py",
              "test_vae_training.py", "test_e2e_parity.py", "test_train_s1.py", "test_flow.py", "test_lm_training.py",
              "test_vae_properties.py", "test_nn.py", "test_moe.py", "test_llm.py", "test_bad_input.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: modules and tests keep their order


def tiny_vae(window=None):
    """(VAEConfig, params) of a 32-wide, 2-layer random AudioVAE (8 latent channels, a 24-wide semantic module);
    ``window``: a sliding attention window instead of full causal attention."""
    from unitok_jax import vae

    kw = {} if window is None else {"use_sliding_window": True, "sliding_window": window}
    bb = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, **kw)
    ref = {
        "enc_kwargs": {"input_dim": 320, "hop_size": 320, "latent_dim": 8, "backbone": bb},
        "dec_kwargs": {"output_dim": 320, "latent_dim": 8, "backbone": bb},
        "semantic_module_kwargs": {"whisper_encoder": {"n_state": 24, "n_head": 2, "n_layer": 2}},
    }
    cfg = vae.VAEConfig.from_reference(ref)
    return cfg, vae.init_params(cfg, jax.random.key(0))


def shard_count(sharding) -> int:
    """How many pieces a NamedSharding cuts an array into (the product of the mesh axes its spec uses)."""
    n = 1
    for axis in sharding.spec:
        for a in (axis if isinstance(axis, tuple) else (axis,)):
            if a is not None:
                n *= sharding.mesh.shape[a]
    return n
