"""Shared test setup: float32 matmuls at full precision, and access to the reference fixtures."""
from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(
    os.environ.get("UNITOK_REFERENCE_FIXTURES", str(REPO.parent / "shared" / "fixtures" / "reference"))
)
SHARED_DATA = REPO.parent / "shared" / "data"


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
