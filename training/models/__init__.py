"""Rankers behind one interface: encode a user's sequence, then score candidate items."""

from training.models.base import SequenceBatch, SequenceRanker
from training.models.itemcf import ItemCFConfig, ItemCFRanker
from training.models.popularity import PopularityRanker
from training.models.sasrec import SASRec, SASRecConfig

__all__ = [
    "ItemCFConfig",
    "ItemCFRanker",
    "PopularityRanker",
    "SASRec",
    "SASRecConfig",
    "SequenceBatch",
    "SequenceRanker",
]
