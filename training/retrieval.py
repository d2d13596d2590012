"""Approximate nearest-neighbour index over a model's item embeddings, versioned with the model.

The index is built when an artefact is written and saved in the artefact's version folder as
``item_index.faiss``, so a served model and its retrieval index always come from one training
run. It is a faiss HNSW graph over unit-length item vectors, searched by inner product, which is
cosine similarity. Row r of the index is item index r + 1, because index 0 is padding.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch

from training import storage

logger = logging.getLogger(__name__)

INDEX_FILE = "item_index.faiss"
# Graph degree and search breadth of HNSW: larger values trade speed for recall.
HNSW_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class ItemIndex:
    """Nearest items by cosine similarity of their embeddings; ids are item indices (1..N-1)."""

    def __init__(self, index: faiss.Index, embeddings: np.ndarray) -> None:
        self.index = index
        self.index.hnsw.efSearch = HNSW_EF_SEARCH
        self.embeddings = _unit_rows(embeddings)
        """Unit-length item vectors by item index, (N, D); row 0 is padding."""

    @classmethod
    def build(cls, embeddings: np.ndarray | torch.Tensor) -> "ItemIndex":
        """Index the item vectors (N, D) of a model, padding row 0 included and left out of the index."""
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().numpy()
        if embeddings.ndim != 2 or embeddings.shape[0] < 2:
            raise ValueError(f"item embeddings must be (N, D) with N >= 2, got shape {embeddings.shape}")
        index = faiss.IndexHNSWFlat(embeddings.shape[1], HNSW_NEIGHBORS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(_unit_rows(embeddings[1:]))
        return cls(index, embeddings)

    @property
    def num_items(self) -> int:
        return int(self.index.ntotal)

    def query_vector(self, item_indices: np.ndarray, weights: np.ndarray) -> np.ndarray | None:
        """Weighted mean of the unit vectors of known items (index > 0), or None without any."""
        known = (item_indices > 0) & (item_indices < self.embeddings.shape[0])
        if not known.any():
            return None
        vectors = self.embeddings[item_indices[known]] * weights[known, None]
        return vectors.sum(axis=0)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """Return up to k item indices nearest to ``query`` (D,), nearest first."""
        if k < 1:
            return np.zeros(0, dtype=np.int64)
        _, rows = self.index.search(_unit_rows(query[None, :]), min(k, self.num_items))
        rows = rows[0]
        return rows[rows >= 0].astype(np.int64) + 1

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / INDEX_FILE
        faiss.write_index(self.index, str(path))
        return path


def write_index(folder: str | Path, item_embeddings: torch.Tensor | None) -> Path | None:
    """Build the index of a model's item embeddings into ``folder``; skip models without them."""
    if item_embeddings is None:
        logger.info("The model has no item embeddings, so no retrieval index is written")
        return None
    return ItemIndex.build(item_embeddings).save(folder)


def load_index(location: str, item_embeddings: torch.Tensor | None) -> ItemIndex | None:
    """Load the index stored in an artefact's version folder (local path or URI).

    An artefact written before indexes existed has no index file. Its index is then built in
    memory from ``item_embeddings``, which takes seconds for a million items.
    """
    if item_embeddings is None:
        return None
    embeddings = item_embeddings.detach().cpu().numpy()
    path = storage.join(location, INDEX_FILE)
    if not storage.exists(path):
        logger.warning("No %s in %s; building the retrieval index in memory", INDEX_FILE, location)
        return ItemIndex.build(embeddings)
    if storage.has_scheme(path):
        filesystem, remote = storage.resolve(path)
        with tempfile.TemporaryDirectory(prefix="seqrec-index-") as folder:
            local = Path(folder) / INDEX_FILE
            with filesystem.open_input_stream(remote) as source:
                local.write_bytes(source.read())
            index = faiss.read_index(str(local))
    else:
        index = faiss.read_index(str(path))
    if index.ntotal != embeddings.shape[0] - 1:
        raise ValueError(
            f"{path} indexes {index.ntotal} items but the model has {embeddings.shape[0] - 1}; "
            "the index belongs to another model version"
        )
    return ItemIndex(index, embeddings)
