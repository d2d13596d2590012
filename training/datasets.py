"""Named public data sets and how to ingest each into canonical events.

Each data set is a file in a data folder, an ingest format of ``training.events.ingest_events`` and,
for Amazon Beauty in the S3-Rec format, an item attribute file. The folder is passed explicitly or
named by the ``SEQREC_DATA_DIR`` environment variable; the files are never bundled with seqrec.

Item attributes become the model's category input, which takes one category per event. The S3-Rec
file lists several attribute ids per item (its brand and category path), and ``CategoryRule``
decides how they become one category id:

- ``combination``: each distinct set of attributes is one category. Two items share a category
  exactly when they share brand and category path, so no attribute is dropped.
- ``first``: the first listed attribute id.

Items without attributes get category 0, the padding category, which adds nothing to the input.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

from training import storage
from training.events import PAIRS, RECBOLE, SEQUENCES, TAOBAO, IngestReport, ingest_events

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SEQREC_DATA_DIR"
"""Environment variable naming the folder that contains the public data sets."""

CategoryRule = Literal["combination", "first"]
CATEGORY_RULES: tuple[str, ...] = ("combination", "first")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A public data set: where its files lie inside the data folder and how to read them."""

    name: str
    events_file: str
    """Path of the event log, relative to the data folder."""
    source_format: str
    """Ingest format of ``ingest_events``."""
    attributes_file: str | None = None
    """JSON object mapping each item id to a list of attribute ids, relative to the data folder."""
    has_timestamps: bool = False
    """Whether the source has real event times; without them ingestion numbers events one second apart."""
    has_behaviors: bool = False
    """Whether the source distinguishes behaviour types; without them every event is a view."""
    description: str = ""

    @property
    def has_categories(self) -> bool:
        return self.source_format == TAOBAO or self.attributes_file is not None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="beauty-s3rec",
            events_file="amazon_s3rec/Beauty.txt",
            source_format=SEQUENCES,
            attributes_file="amazon_s3rec/Beauty_item2attributes.json",
            description="Amazon Beauty 5-core as split by S3-Rec: one user sequence per line, item attributes",
        ),
        DatasetSpec(
            name="beauty-bert4rec",
            events_file="amazon_beauty_bert4rec/beauty.txt",
            source_format=PAIRS,
            description="Amazon Beauty as preprocessed for BERT4Rec: 'user item' pairs in time order",
        ),
        DatasetSpec(
            name="ml-100k",
            events_file="ml-100k_recbole/ml-100k.inter",
            source_format=RECBOLE,
            has_timestamps=True,
            description="MovieLens 100K in RecBole's atomic format, with rating times",
        ),
        DatasetSpec(
            name="taobao-head",
            events_file="taobao_userbehavior/UserBehavior_head.csv",
            source_format=TAOBAO,
            has_timestamps=True,
            has_behaviors=True,
            description="First rows of Taobao UserBehavior: categories, behaviour types, timestamps",
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    """Return the registered data set of this name."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(DATASETS)}") from None


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data folder: ``data_dir`` if given, else the one named by ``SEQREC_DATA_DIR``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV)
        if not data_dir:
            raise ValueError(f"no data folder given; pass one or set {DATA_DIR_ENV} to the folder of the data sets")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data folder not found: {path}")
    return path


def load_item_categories(path: str | Path, rule: CategoryRule = "combination") -> dict[int, int]:
    """Map each raw item id of an item-to-attributes JSON file to one category id by ``rule``.

    Category ids of ``combination`` are numbered from 1 in the sorted order of the attribute
    sets, so the mapping does not depend on the order of the file. Items with an empty attribute
    list are left out and so get category 0.
    """
    if rule not in CATEGORY_RULES:
        raise ValueError(f"unknown category rule {rule!r}; expected one of {CATEGORY_RULES}")
    raw = json.loads(storage.read_text(str(path)))
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must contain a JSON object mapping item ids to attribute lists")

    attributes: dict[int, tuple[int, ...]] = {}
    for item, values in raw.items():
        if not isinstance(values, list) or not all(isinstance(value, int) and value > 0 for value in values):
            raise ValueError(f"{path}: attributes of item {item!r} must be a list of positive integers, got {values!r}")
        try:
            item_id = int(item)
        except ValueError:
            raise ValueError(f"{path}: item id {item!r} is not an integer") from None
        if values:
            attributes[item_id] = tuple(values)

    if rule == "first":
        return {item: values[0] for item, values in attributes.items()}
    numbering = {values: number for number, values in enumerate(sorted({tuple(sorted(v)) for v in attributes.values()}), 1)}
    return {item: numbering[tuple(sorted(values))] for item, values in attributes.items()}


def ingest_dataset(
    name: str,
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    category_rule: CategoryRule = "combination",
) -> IngestReport:
    """Ingest a registered data set into canonical events Parquet in ``output_dir``.

    Item attributes, where the data set has them, become categories by ``category_rule``.
    """
    spec = get_dataset(name)
    root = resolve_data_dir(data_dir)
    item_categories = None
    if spec.attributes_file is not None:
        item_categories = load_item_categories(root / spec.attributes_file, category_rule)
        logger.info(
            "Mapped attributes of %d items to %d categories by rule %r",
            len(item_categories),
            len(set(item_categories.values())),
            category_rule,
        )
    return ingest_events(root / spec.events_file, output_dir, spec.source_format, item_categories=item_categories)
