"""Builders shared by tests: a Feast repository in a temporary folder and a small model artefact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from training.artifacts import write_artifact
from training.models import SASRec, SASRecConfig
from training.vocab import Vocabulary

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def copy_feature_repo(destination: Path) -> Path:
    """Copy the project's Feast definitions (not its data) into ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("feature_store.yaml", "features.py"):
        shutil.copy(PROJECT_ROOT / "feature_repo" / name, destination / name)
    return destination


def feast_apply(repo: Path) -> None:
    """Run the `feast apply` command of this environment in ``repo``; raise with its output on failure."""
    feast = Path(sys.executable).with_name("feast")
    result = subprocess.run([str(feast), "apply"], cwd=repo, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"feast apply failed in {repo}:\n{result.stdout}\n{result.stderr}")


def write_random_artifact(model_dir, item_ids, category_ids, item_counts=None, seed: int = 0, trending=()) -> str:
    """Write an artefact with an untrained SASRec over the given raw ids; ``trending`` lists raw ids."""
    item_vocab, category_vocab = Vocabulary(np.asarray(item_ids)), Vocabulary(np.asarray(category_ids))
    config = SASRecConfig(
        num_items=item_vocab.size_with_padding,
        num_categories=category_vocab.size_with_padding,
        max_length=8,
        hidden_size=16,
    )
    torch.manual_seed(seed)
    model = SASRec(config)
    counts = np.zeros(item_vocab.size_with_padding, dtype=np.int64)
    if item_counts is not None:
        counts[item_vocab.lookup(np.asarray(list(item_counts)))] = list(item_counts.values())
    return write_artifact(
        model_dir,
        f"v{seed}",
        model.state_dict(),
        config,
        item_vocab,
        category_vocab,
        counts,
        metrics={},
        run_info={"data": {"events_path": "generated in tests"}},
        trending_items=item_vocab.lookup(np.asarray(list(trending), dtype=np.int64)),
    )
