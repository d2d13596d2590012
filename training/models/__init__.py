"""Rankers behind one interface: encode a user's sequence, then score candidate items."""

from training.models.base import SequenceBatch, SequenceRanker
from training.models.popularity import PopularityRanker
from training.models.sasrec import SASRec, SASRecConfig

__all__ = ["PopularityRanker", "SASRec", "SASRecConfig", "SequenceBatch", "SequenceRanker"]
