"""Session fixtures shared by every test: small real ir_18 models built once per run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from adaface_server.models.checkpoint import random_state_dict, save_adaface_checkpoint
from adaface_server.models.export import export_model

IR18_NAME = "adaface_ir18"
IR18_SEED = 0
IR18_MAX_BATCH = 16


@pytest.fixture(scope="session")
def ir18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AdaFace Lightning-format .ckpt holding seed-0 random ir_18 weights."""
    path = tmp_path_factory.mktemp("checkpoints") / "adaface_ir18_seed0.ckpt"
    save_adaface_checkpoint(random_state_dict("ir_18", IR18_SEED), path, arch="ir_18")
    return path


@pytest.fixture(scope="session")
def ir18_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(repository, "adaface_ir18"): the exporter's output for seed-0 random (untrained) ir_18.

    Same weights as ir18_checkpoint, so tests/data/golden_ir18.npz applies to both.
    """
    repository = tmp_path_factory.mktemp("model_repository")
    # The untrained-weights banner is expected here; keep the test log readable.
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    try:
        export_model(
            None, "ir_18", repository, IR18_NAME, max_batch_size=IR18_MAX_BATCH, seed=IR18_SEED
        )
    finally:
        logging.getLogger("adaface_server.export").setLevel(logging.NOTSET)
    return repository, IR18_NAME


@pytest.fixture(scope="session")
def ir18_uint8_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(repository, "adaface_ir18"): the same seed-0 ir_18 exported with --input-dtype uint8
    (raw pixels in, normalised inside the graph); same name as ir18_repository, so a server
    can be pointed at one while Triton serves the other."""
    repository = tmp_path_factory.mktemp("model_repository_uint8")
    logging.getLogger("adaface_server.export").setLevel(logging.ERROR)
    try:
        export_model(
            None,
            "ir_18",
            repository,
            IR18_NAME,
            max_batch_size=IR18_MAX_BATCH,
            seed=IR18_SEED,
            input_dtype="uint8",
        )
    finally:
        logging.getLogger("adaface_server.export").setLevel(logging.NOTSET)
    return repository, IR18_NAME


DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def golden_ir18() -> dict[str, object]:
    """Upstream-computed ir_18 (seed 0) references: inputs [3,3,112,112], embeddings, norms;
    pixels: the same images as uint8 NCHW BGR (what a uint8-input model takes)."""
    import numpy as np
    import torch
    from PIL import Image

    golden = np.load(DATA_DIR / "golden_ir18.npz")
    images = [np.asarray(Image.open(DATA_DIR / str(n)).convert("RGB")) for n in golden["images"]]
    # Model contract: RGB -> BGR, (x / 255 - 0.5) / 0.5, NCHW float32.
    pixels = np.ascontiguousarray(np.stack(images)[..., ::-1].transpose(0, 3, 1, 2))
    bgr = np.stack(images)[..., ::-1].astype(np.float32)
    inputs = torch.from_numpy(
        np.ascontiguousarray(((bgr / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2))
    )
    return {
        "inputs": inputs,
        "pixels": torch.from_numpy(pixels),
        "embeddings": torch.from_numpy(golden["embeddings"]),
        "norms": torch.from_numpy(golden["norms"]),
    }
