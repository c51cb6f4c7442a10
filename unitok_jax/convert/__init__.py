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

# component name -> how to rebuild its config object from the saved dict
CONFIG_LOADERS: dict[str, Callable[[dict], Any]] = {"vae": VAEConfig.from_dict}


@dataclasses.dataclass
class Checkpoint:
    """Configs and params per component (``"vae"``, ...); params are plain pytrees of arrays."""

    configs: dict[str, Any]
    params: dict[str, Any]
    source: str = ""

    def num_params(self, component: str) -> int:
        import jax

        return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(self.params[component])))


def _vae_section(config: dict) -> tuple[dict, list[str]] | None:
    """The AudioVAE kwargs in a reference config.json and the prefixes its weights may sit under."""
    if "audio_tokenizer_config" in config:  # full Ming-UniAudio checkpoint
        return config["audio_tokenizer_config"], ["audio.", ""]
    if "kwargs" in config and "enc_kwargs" in config["kwargs"]:  # {"class": ..., "kwargs": ...} (fixtures)
        return config["kwargs"], ["", "audio."]
    if "enc_kwargs" in config:  # standalone MingTok-Audio
        return config, ["", "audio."]
    return None


def convert_reference(src: str) -> Checkpoint:
    """Read a reference checkpoint folder (``config.json`` + ``model.safetensors`` or a sharded set with
    ``model.safetensors.index.json``) and convert every component we support (currently: the AudioVAE)."""
    config = read_json(os.path.join(src, "config.json"))
    section = _vae_section(config)
    if section is None:
        raise ConversionError(
            f"{src}/config.json holds no AudioVAE config (expected enc_kwargs/dec_kwargs, or audio_tokenizer_config)"
        )
    weights = read_weights(src)
    kwargs, prefixes = section
    prefix = detect_prefix(weights, "encoder.fc1.weight", prefixes)
    cfg, params = convert_vae(weights, kwargs, prefix=prefix, source=src)
    return Checkpoint({"vae": cfg}, {"vae": params}, source=os.path.abspath(src))


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
    for name, d in meta["components"].items():
        if name not in CONFIG_LOADERS:
            raise ConversionError(f"{meta_path}: unknown component {name!r}")
        configs[name] = CONFIG_LOADERS[name](d)
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
    return Checkpoint(configs, {k: params[k] for k in configs}, source=meta.get("source", ""))


__all__ = ["Checkpoint", "ConversionError", "convert_reference", "load", "save"]
