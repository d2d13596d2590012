"""Training checkpoints: model, optimizer, epoch, progress and every worker's RNG state.

Rank 0 writes a checkpoint into a fresh local folder and hands it to ``ray.train.report``, which
copies it to the run's storage and registers it only once the copy is complete. A restarted run
restores the latest registered checkpoint, so a checkpoint cut short by a failure is never read.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist

MODEL_STATE_FILE = "best_model.pt"
TRAIN_STATE_FILE = "train_state.pt"
# Bumped when the contents of TRAIN_STATE_FILE change incompatibly.
CHECKPOINT_FORMAT = 2


def rng_state() -> dict:
    """This process's Python, NumPy and torch RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Gather every worker's RNG state, by rank. All ranks must call it, because it is a collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rng_state()]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def report_with_checkpoint(metrics: dict, train_state: dict, best_model_state: dict | None) -> None:
    """Report an epoch's metrics with a checkpoint of ``train_state`` and the best model so far."""
    with tempfile.TemporaryDirectory(prefix="seqrec-checkpoint-") as folder:
        torch.save({"format": CHECKPOINT_FORMAT, **train_state}, Path(folder) / TRAIN_STATE_FILE)
        torch.save(best_model_state, Path(folder) / MODEL_STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_checkpoint(checkpoint: ray.train.Checkpoint) -> tuple[dict, dict | None]:
    """Read ``(train_state, best_model_state)`` from a checkpoint; raise if it is incomplete."""
    with checkpoint.as_directory() as folder:
        missing = [name for name in (TRAIN_STATE_FILE, MODEL_STATE_FILE) if not (Path(folder) / name).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {checkpoint.path} lacks {missing}; it cannot be resumed from")
        state = torch.load(Path(folder) / TRAIN_STATE_FILE, weights_only=False, map_location="cpu")
        best_model = torch.load(Path(folder) / MODEL_STATE_FILE, weights_only=True, map_location="cpu")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {checkpoint.path} has format {state.get('format')}, expected {CHECKPOINT_FORMAT}; "
            "start a new run instead of resuming this one"
        )
    return state, best_model
