"""Official PyTorch checkpoints -> unitok_jax checkpoints (an orbax params tree plus our own config JSON).

``python -m unitok_jax.convert SRC_DIR DST_DIR`` converts; :func:`load` restores. Only this package knows the
reference parameter names; conversion reads safetensors with numpy (no torch).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from unitok_jax.convert.common import ConversionError, detect_prefix, read_json, read_weights
from unitok_jax.convert.vae import convert_vae
from unitok_jax.vae import VAEConfig

FORMAT = "unitok_jax"
VERSION = 1
CONFIG_NAME = "unitok_config.json"
PARAMS_DIR = "params"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Top-level key prefixes of a full Ming-UniAudio checkpoint (spec 6.2); anything else is unexpected.
FULL_PREFIXES = ("audio.", "model.", "flowloss.", "linear_proj_audio.", "stop_head.")


def _uniaudio_from_dict(d: dict):
    from unitok_jax.model import UniAudioConfig

    return UniAudioConfig.from_dict(d)


# component name -> how to rebuild its config object from the saved dict
CONFIG_LOADERS: dict[str, Callable[[dict], Any]] = {"vae": VAEConfig.from_dict, "uniaudio": _uniaudio_from_dict}


@dataclasses.dataclass
class Checkpoint:
    """Configs and params per component; params are plain pytrees of arrays.

    Two kinds: a tokenizer-only checkpoint (``"vae"``: VAEConfig + VAE params) and a full model (``"uniaudio"``:
    UniAudioConfig + params keyed like the official prefixes: audio / model / flowloss / linear_proj_audio /
    stop_head)."""

    configs: dict[str, Any]
    params: dict[str, Any]
    source: str = ""
    path: str = ""  # where it was loaded from (holds tokenizer files for a full model)

    def num_params(self, component: str) -> int:
        import jax

        return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(self.params[component])))

    def vae(self) -> tuple[VAEConfig, Any]:
        """(VAEConfig, VAE params) of either kind."""
        if "vae" in self.configs:
            return self.configs["vae"], self.params["vae"]
        if "uniaudio" in self.configs:
            return self.configs["uniaudio"].vae, self.params["uniaudio"]["audio"]
        raise ConversionError(f"{self.path or self.source}: the checkpoint holds no AudioVAE")


def _vae_section(config: dict) -> tuple[dict, list[str]] | None:
    """The AudioVAE kwargs in a reference config.json and the prefixes its weights may sit under."""
    if "audio_tokenizer_config" in config:  # full Ming-UniAudio checkpoint
        return config["audio_tokenizer_config"], ["audio.", ""]
    if "kwargs" in config and "enc_kwargs" in config["kwargs"]:  # {"class": ..., "kwargs": ...} (fixtures)
        return config["kwargs"], ["", "audio."]
    if "enc_kwargs" in config:  # standalone MingTok-Audio
        return config, ["", "audio."]
    return None


def convert_full(src: str, config: dict) -> Checkpoint:
    """A full Ming-UniAudio folder -> one UniAudio checkpoint (every component, cross-checked)."""
    import warnings

    from unitok_jax.convert.flow import convert_dit, convert_heads
    from unitok_jax.convert.llm import convert_llm
    from unitok_jax.model import UniAudioConfig

    weights = read_weights(src)  # lazy: tensors are read as each converter asks for them
    stray = sorted(k for k in weights if not k.startswith(FULL_PREFIXES))
    if stray:
        raise ConversionError(f"{src}: unexpected key(s) outside {list(FULL_PREFIXES)}: {stray[:10]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown llm_config keys are reported by the LLM converter's own warning
        llm_cfg, llm_vars = convert_llm(weights, config["llm_config"])
    try:
        cfg = UniAudioConfig.from_bailingmm(config)
    except (KeyError, ValueError, TypeError) as e:
        raise ConversionError(f"{src}/config.json: invalid model config: {e}") from e
    cfg = dataclasses.replace(cfg, llm=llm_cfg)
    _, vae_params = convert_vae(weights, config["audio_tokenizer_config"], prefix="audio.", source=src)
    flow_params = convert_dit(weights, cfg.flow, prefix="flowloss.cfm.model.", source=src)
    heads_params = convert_heads(weights, cfg.heads, source=src)
    params = {
        "audio": vae_params,
        "model": llm_vars["params"],
        "flowloss": flow_params,
        "linear_proj_audio": heads_params["pooling"],
        "stop_head": heads_params["stop_head"],
    }
    return Checkpoint({"uniaudio": cfg}, {"uniaudio": params}, source=os.path.abspath(src))


def convert_reference(src: str) -> Checkpoint:
    """Read a reference checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded set with
    ``model.safetensors.index.json``) and convert it: a full Ming-UniAudio folder (``llm_config`` +
    ``audio_tokenizer_config`` + ``ditar_config``) gives a ``"uniaudio"`` checkpoint, a MingTok-Audio folder a
    ``"vae"`` one."""
    config = read_json(os.path.join(src, "config.json"))
    if all(k in config for k in ("llm_config", "audio_tokenizer_config", "ditar_config")):
        ckpt = convert_full(src, config)
        ckpt.path = os.path.abspath(src)
        return ckpt
    section = _vae_section(config)
    if section is None:
        raise ConversionError(
            f"{src}/config.json holds no AudioVAE config (expected enc_kwargs/dec_kwargs, or audio_tokenizer_config)"
        )
    weights = read_weights(src)
    kwargs, prefixes = section
    prefix = detect_prefix(weights, "encoder.fc1.weight", prefixes)
    cfg, params = convert_vae(weights, kwargs, prefix=prefix, source=src)
    return Checkpoint({"vae": cfg}, {"vae": params}, source=os.path.abspath(src), path=os.path.abspath(src))


def save(ckpt: Checkpoint, dst: str, *, overwrite: bool = False) -> None:
    """Write ``dst/unitok_config.json`` and ``dst/params`` (orbax). The folder is assembled under a temporary name
    and renamed into place, so an interrupted save never leaves a half-written checkpoint at ``dst``."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        import jax

        if jax.process_count() > 1:  # a single process writes (host params): no cross-process barriers
            me = jax.process_index()
            ckptr = ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"export{me}"))
        else:
            ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), ckpt.params)
        ckptr.wait_until_finished()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "source": ckpt.source,
            "components": {k: dataclasses.asdict(v) for k, v in ckpt.configs.items()},
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        for name in TOKENIZER_FILES:  # the text tokenizer travels with a full model
            if ckpt.path and os.path.isfile(os.path.join(ckpt.path, name)):
                shutil.copy2(os.path.join(ckpt.path, name), os.path.join(tmp, name))
        if os.path.exists(dst):
            old = dst + ".old"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def check_params(component: str, cfg, params, where: str) -> None:
    """Raise :class:`ConversionError` (prefixed by ``where``) unless every parameter the config implies is present
    with the shape it implies (shapes from ``jax.eval_shape`` of the model's init: no allocation)."""
    import jax

    from unitok_jax import model, vae

    init = {"vae": vae.init_params, "uniaudio": model.init_params}[component]
    want = jax.eval_shape(lambda k: init(cfg, k), jax.random.key(0))
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    missing, wrong = [], []
    for k, v in jax.tree_util.tree_leaves_with_path(want):
        name = jax.tree_util.keystr(k)
        if name not in have:
            missing.append(name)
        elif tuple(have[name]) != tuple(v.shape):
            wrong.append(f"{name} has shape {tuple(have[name])}, the config implies {tuple(v.shape)}")
    if wrong or missing:
        more = len(wrong) + len(missing) - 3
        raise ConversionError(f"{where}: " + "; ".join((wrong + [f"missing {m}" for m in missing])[:3])
                              + (f" (and {more} more)" if more > 0 else ""))


def load(path: str) -> Checkpoint:
    """Restore a checkpoint written by :func:`save` (or the CLI)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{path} is not a unitok_jax checkpoint (no {CONFIG_NAME}; convert it first with "
                              f"`python -m unitok_jax.convert SRC {path}`)")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConversionError(f"{meta_path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('version')!r} (expected {FORMAT!r} {VERSION})")
    configs = {}
    components = meta.get("components")
    if not isinstance(components, dict) or not components:
        raise ConversionError(f"{meta_path}: no 'components' object (damaged config?)")
    for name, d in components.items():
        if name not in CONFIG_LOADERS:
            raise ConversionError(f"{meta_path}: unknown component {name!r}")
        try:
            configs[name] = CONFIG_LOADERS[name](d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConversionError(f"{meta_path}: invalid {name} config ({type(e).__name__}: {e})") from None
    params_dir = os.path.join(path, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise ConversionError(f"{path}: the params folder {PARAMS_DIR}/ is missing")
    try:
        params = ocp.StandardCheckpointer().restore(params_dir)
    except Exception as e:  # orbax raises several types for damaged folders
        raise ConversionError(f"{params_dir}: cannot restore params: {e}") from e
    missing = sorted(set(configs) - set(params))
    if missing:
        raise ConversionError(f"{params_dir}: no params for component(s) {missing}")
    for name, cfg in configs.items():
        check_params(name, cfg, params[name], f"{path}: {CONFIG_NAME} does not match the weights in {PARAMS_DIR}/")
    return Checkpoint(configs, {k: params[k] for k in configs}, source=meta.get("source", ""), path=path)


__all__ = ["Checkpoint", "ConversionError", "convert_reference", "load", "save"]
