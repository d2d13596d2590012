"""Versioned model artefacts on disk.

An artefact is one folder ``<model_dir>/<version>/`` holding:

- ``model.pt``: the SASRec weights (a state dict);
- ``item_index.faiss``: the ANN index of the item embeddings, for retrieval (``training.retrieval``);
- ``config.json``: the model config, the training config and what data it was trained on;
- ``item_vocab.npy``, ``category_vocab.npy``: raw ids by index, so index i is ``vocab[i - 1]``;
- ``item_counts.npy``: training events per item index, for the popularity fallback;
- ``trending_items.npy``: item indices of the trending list, best first (``training.trending``);
- ``metrics.json``: validation and test metrics at the best epoch, for the model and the
  baselines, with the per-epoch history and timing;
- ``training_curve.png``: train loss and validation metrics by epoch (written by training runs).

``<model_dir>/LATEST`` names the newest complete version and is written after the version's
files, so a reader never sees half an artefact. ``model_dir`` may be a local path or a URI.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from training import retrieval, storage
from training.models import PopularityRanker, SASRec, SASRecConfig
from training.vocab import Vocabulary

logger = logging.getLogger(__name__)

LATEST = "LATEST"
TRENDING_FILE = "trending_items.npy"


@dataclasses.dataclass
class ModelArtifact:
    """A loaded artefact: the model, its vocabularies and the popularity baseline trained with it."""

    version: str
    location: str
    """Local path or URI of the version folder."""
    model: SASRec
    item_vocab: Vocabulary
    category_vocab: Vocabulary
    popularity: PopularityRanker
    trending_items: np.ndarray
    """Item indices of the trending list, best first; empty for artefacts written without one."""
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
    extra_files: dict[str, bytes] | None = None,
    trending_items: np.ndarray | None = None,
) -> str:
    """Write a complete artefact version and point LATEST at it; return the version's location.

    ``extra_files`` maps further file names in the version folder to their contents.

    ``model_dir`` is a local path or a URI. Locally the version folder appears by one rename. On an
    object store its files are uploaded first, and LATEST, written last, is what makes it visible.
    """
    model_dir = storage.normalize(model_dir)
    final = storage.join(model_dir, version)
    if storage.exists(final):
        raise FileExistsError(f"model version {version} already exists in {model_dir}")
    storage.make_dirs(model_dir)

    local = not storage.has_scheme(model_dir)
    staging = Path(model_dir) / f".{version}.partial" if local else Path(tempfile.mkdtemp(prefix="seqrec-model-"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(model_state, staging / "model.pt")
    model = SASRec(model_config)
    model.load_state_dict(model_state)
    retrieval.write_index(staging, model.item_embeddings())
    item_vocab.save(staging / "item_vocab.npy")
    category_vocab.save(staging / "category_vocab.npy")
    np.save(staging / "item_counts.npy", np.asarray(item_counts, dtype=np.int64))
    np.save(staging / TRENDING_FILE, np.asarray(trending_items if trending_items is not None else [], dtype=np.int64))
    config = {"version": version, "model": dataclasses.asdict(model_config), **run_info}
    (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for name, content in (extra_files or {}).items():
        (staging / name).write_bytes(content)

    if local:
        os.replace(staging, final)
        pointer = Path(model_dir) / f".{LATEST}.partial"
        pointer.write_text(version + "\n")
        os.replace(pointer, Path(model_dir) / LATEST)
    else:
        storage.upload_dir(staging, final)
        shutil.rmtree(staging, ignore_errors=True)
        storage.write_text(storage.join(model_dir, LATEST), version + "\n")
    logger.info("Wrote model artefact %s to %s", version, final)
    return final


def resolve_version(model_dir: str | Path, version: str = "latest") -> str:
    """Return the location of a version, where ``latest`` reads the LATEST pointer."""
    model_dir = storage.normalize(model_dir)
    if version == "latest":
        pointer = storage.join(model_dir, LATEST)
        if not storage.exists(pointer):
            raise FileNotFoundError(
                f"no model artefact in {model_dir}: {LATEST} is missing; train a model with "
                "`python -m training.train` first"
            )
        version = storage.read_text(pointer).strip()
    location = storage.join(model_dir, version)
    if not storage.exists(storage.join(location, "model.pt")):
        raise FileNotFoundError(f"model version {version!r} not found in {model_dir}")
    return location


def load_artifact(model_dir: str | Path, version: str = "latest") -> ModelArtifact:
    """Load an artefact version for inference; the model is in eval mode.

    An artefact on an object store is first copied into a local temporary folder.
    """
    location = resolve_version(model_dir, version)
    path = Path(location) if not storage.has_scheme(location) else storage.download_dir(location)
    config = json.loads((path / "config.json").read_text())
    model = SASRec(SASRecConfig(**config["model"]))
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
    model.eval()
    return ModelArtifact(
        version=config["version"],
        location=location,
        model=model,
        item_vocab=Vocabulary.load(path / "item_vocab.npy"),
        category_vocab=Vocabulary.load(path / "category_vocab.npy"),
        popularity=PopularityRanker(np.load(path / "item_counts.npy")),
        trending_items=np.load(path / TRENDING_FILE) if (path / TRENDING_FILE).exists() else np.zeros(0, dtype=np.int64),
        config=config,
        metrics=json.loads((path / "metrics.json").read_text()),
    )
