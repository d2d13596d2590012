"""Versioned model artefacts on disk.

An artefact is one folder ``<model_dir>/<version>/`` holding:

- ``model.pt``: the SASRec weights (a state dict);
- ``config.json``: the model config, the training config and what data it was trained on;
- ``item_vocab.npy``, ``category_vocab.npy``: raw ids by index, so index i is ``vocab[i - 1]``;
- ``item_counts.npy``: training events per item index, for the popularity fallback;
- ``metrics.json``: validation and test metrics at the best epoch, for the model and the baseline.

A version folder is written under a temporary name and renamed when complete, and
``<model_dir>/LATEST`` names the newest complete version, so a reader never sees half an artefact.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from training.models import PopularityRanker, SASRec, SASRecConfig
from training.vocab import Vocabulary

logger = logging.getLogger(__name__)

LATEST = "LATEST"


@dataclasses.dataclass
class ModelArtifact:
    """A loaded artefact: the model, its vocabularies and the popularity baseline trained with it."""

    version: str
    path: Path
    model: SASRec
    item_vocab: Vocabulary
    category_vocab: Vocabulary
    popularity: PopularityRanker
    config: dict
    metrics: dict


def new_version() -> str:
    """A sortable version name: UTC time to the second plus a short random suffix."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{uuid.uuid4().hex[:6]}"


def write_artifact(
    model_dir: str | Path,
    version: str,
    model_state: dict,
    model_config: SASRecConfig,
    item_vocab: Vocabulary,
    category_vocab: Vocabulary,
    item_counts: np.ndarray,
    metrics: dict,
    run_info: dict,
) -> Path:
    """Write a complete artefact version and point LATEST at it; return its folder."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    final = model_dir / version
    if final.exists():
        raise FileExistsError(f"model version {version} already exists in {model_dir}")
    staging = model_dir / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    torch.save(model_state, staging / "model.pt")
    item_vocab.save(staging / "item_vocab.npy")
    category_vocab.save(staging / "category_vocab.npy")
    np.save(staging / "item_counts.npy", np.asarray(item_counts, dtype=np.int64))
    config = {"version": version, "model": dataclasses.asdict(model_config), **run_info}
    (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    os.replace(staging, final)

    pointer = model_dir / f".{LATEST}.partial"
    pointer.write_text(version + "\n")
    os.replace(pointer, model_dir / LATEST)
    logger.info("Wrote model artefact %s to %s", version, final)
    return final


def resolve_version(model_dir: str | Path, version: str = "latest") -> Path:
    """Return the folder of a version, where ``latest`` reads the LATEST pointer."""
    model_dir = Path(model_dir)
    if version == "latest":
        pointer = model_dir / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(
                f"no model artefact in {model_dir}: {LATEST} is missing; train a model with "
                "`python -m training.train` first"
            )
        version = pointer.read_text().strip()
    path = model_dir / version
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"model version {version!r} not found in {model_dir}")
    return path


def load_artifact(model_dir: str | Path, version: str = "latest") -> ModelArtifact:
    """Load an artefact version for inference; the model is in eval mode."""
    path = resolve_version(model_dir, version)
    config = json.loads((path / "config.json").read_text())
    model = SASRec(SASRecConfig(**config["model"]))
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    model.eval()
    return ModelArtifact(
        version=config["version"],
        path=path,
        model=model,
        item_vocab=Vocabulary.load(path / "item_vocab.npy"),
        category_vocab=Vocabulary.load(path / "category_vocab.npy"),
        popularity=PopularityRanker(np.load(path / "item_counts.npy")),
        config=config,
        metrics=json.loads((path / "metrics.json").read_text()),
    )
