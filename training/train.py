"""Ray Train entry point: build examples, train SASRec with DDP, write an artefact.

Run it on a laptop or submit it to a cluster unchanged::

    ray job submit --working-dir . -- python -m training.train --events /data/events.parquet \\
        --model-dir /data/models

Workers run on CPUs, or on GPUs where the cluster has one per worker (``--use-gpu``). Each epoch
validates with full-ranking metrics, saves a checkpoint (model, optimizer, epoch, progress and
every worker's RNG state) and stops early when validation NDCG@10 stops improving. A run that
loses a worker restarts from the latest complete checkpoint. Test metrics are those of the best
validation epoch. The popularity and ItemCF baselines are evaluated on the same split. The
artefact contains ``metrics.json`` (per-epoch history, test metrics, baselines, timing) and
``training_curve.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import logging
import os
import signal
import time
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train.torch import TorchTrainer

from training import examples as ex
from training import storage
from training.artifacts import new_version, write_artifact
from training.checkpoints import gather_rng_states, load_checkpoint, report_with_checkpoint, set_rng_state
from training.cluster import connect_ray
from training.evaluation import METRIC_NAMES, SAMPLED_PREFIX, NegativeSampler, SampledMetricsConfig, add_sums
from training.evaluation import evaluate_batch, means
from training.models import ItemCFConfig, ItemCFRanker, PopularityRanker, SASRec, SASRecConfig, SequenceBatch
from training.models import SequenceRanker
from training.models.itemcf import count_cooccurrences, top_similarities
from training.models.sasrec import ACTIVATIONS
from training.run_report import training_curve_png
from training.schema import PADDING_ID, SEQUENCE_LENGTH, USER_ID
from training.trending import TrendingConfig, trending_items

logger = logging.getLogger(__name__)

# Fault injection for recovery tests: "<epoch>:<marker file>" makes the last worker kill itself
# (SIGKILL) during that epoch (1-based), once: the marker file records that it happened.
FAIL_WORKER_ENV = "SEQREC_FAIL_WORKER_AT_EPOCH"
# Ray Train's controller polls workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S in Ray 2.60).
# The injected failure waits longer than that, so the previous epoch's report has been taken.
_FAILURE_DELAY_S = 5.0
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """Optimisation and run settings of one training job."""

    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    patience: int = 3
    """Stop after this many epochs without a better validation NDCG@10."""
    eval_batch_size: int = 512
    num_workers: int = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    """``auto`` trains on GPUs when the cluster has one for each worker, else on CPUs."""
    seed: int = 0
    loss: Literal["auto", "full", "sampled"] = "auto"
    """Full-softmax cross-entropy, or sampled softmax against shared uniform negatives. ``auto``
    picks full softmax up to ``full_softmax_max_items`` items."""
    num_negatives: int = 2048
    full_softmax_max_items: int = 10_000
    log_interval_s: float = 30.0
    """Rank 0 logs one progress line per interval within an epoch, besides one line per epoch."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    sampled_metrics: SampledMetricsConfig | None = None
    """Also report sampled-negative metrics, with this named sampler and seed."""
    exclude_seen: bool = False
    """Exclusion of each user's input items from that user's evaluation ranking (see training.evaluation)."""
    shuffle_buffer_rows: int = 50_000
    """Minimum number of rows each worker buffers and draws its training batches from at random, in a
    new order every epoch. Examples arrive sorted by user, so a buffer smaller than the worker's share
    of them draws each batch from a narrower range of users."""
    window_stride: int | None = None
    """Step between training windows of a long sequence; None means the sequence length. A smaller
    step gives every target more earlier events to attend to, and costs more windows per epoch."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size", "num_workers", "shuffle_buffer_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.loss not in ("auto", "full", "sampled"):
            raise ValueError(f"loss must be 'auto', 'full' or 'sampled', got {self.loss!r}")
        if self.use_gpu not in ("auto", "yes", "no"):
            raise ValueError(f"use_gpu must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")
        if self.window_stride is not None and self.window_stride < 1:
            raise ValueError(f"window_stride must be at least 1, got {self.window_stride}")
        if self.log_interval_s <= 0:
            raise ValueError(f"log_interval_s must be positive, got {self.log_interval_s}")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be at least 0, got {self.max_failures}")
        if isinstance(self.sampled_metrics, dict):
            object.__setattr__(self, "sampled_metrics", SampledMetricsConfig(**self.sampled_metrics))

    def uses_full_softmax(self, num_items: int) -> bool:
        return self.loss == "full" or (self.loss == "auto" and num_items <= self.full_softmax_max_items)


# --- Model inputs and evaluation on a worker ---------------------------------------------------


def _matrix(batch: pa.Table, column: str) -> torch.Tensor:
    """Convert a fixed-size list column to a (B, L) int64 tensor."""
    values = batch[column].combine_chunks().flatten().to_numpy()
    return torch.from_numpy(values.astype(np.int64, copy=True).reshape(batch.num_rows, -1))


def _inputs(batch: pa.Table) -> SequenceBatch:
    return SequenceBatch(**{name: _matrix(batch, name) for name in ex.INPUT_COLUMNS})


def _metric_names(sampled: bool) -> list[str]:
    names = ["count", *METRIC_NAMES]
    return names + [SAMPLED_PREFIX + name for name in METRIC_NAMES] if sampled else names


def evaluate_split(
    ranker: SequenceRanker,
    shard,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
    sampler: NegativeSampler | None = None,
    exclude_seen: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics over one split; each worker ranks the users with ``user_id % world_size == rank``."""
    ranker.eval()
    sums: dict[str, float] = {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        batch = batch.filter(pa.array(batch[USER_ID].to_numpy() % world_size == rank))
        if batch.num_rows:
            targets = _matrix(batch, ex.TARGETS)[:, -1].to(device)
            part = evaluate_batch(
                ranker, _inputs(batch).to(device), targets, batch[USER_ID].to_numpy(), sampler, exclude_seen
            )
            add_sums(sums, part)
    return means(_all_reduce_sums(sums, _metric_names(sampler is not None), device))


def _all_reduce_sums(sums: dict[str, float], names: list[str], device: torch.device | str = "cpu") -> dict[str, float]:
    """Sum metric sums over workers; a worker without users contributes zeros."""
    values = torch.tensor([sums.get(name, 0.0) for name in names], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(names, values.tolist()))


def next_item_loss(
    hidden: torch.Tensor, targets: torch.Tensor, item_embedding: torch.nn.Embedding, num_negatives: int | None
) -> torch.Tensor:
    """Cross-entropy of the next item at every position that has a target.

    hidden is (B, L, D) and targets (B, L), with 0 where a position has no target. With
    ``num_negatives`` None the softmax runs over all items. Otherwise it runs over the target and
    ``num_negatives`` items drawn uniformly and shared by the batch. A negative equal to the
    target is masked out.
    """
    has_target = targets != PADDING_ID
    states, positives = hidden[has_target], targets[has_target]  # (P, D), (P,)
    if num_negatives is None:
        logits = states @ item_embedding.weight.T  # (P, N)
        logits[:, PADDING_ID] = float("-inf")
        return F.cross_entropy(logits, positives)
    negatives = torch.randint(1, item_embedding.num_embeddings, (num_negatives,), device=states.device)
    positive_logits = (states * item_embedding(positives)).sum(-1, keepdim=True)  # (P, 1)
    negative_logits = states @ item_embedding(negatives).T  # (P, S)
    negative_logits = negative_logits.masked_fill(negatives.unsqueeze(0) == positives.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive_logits, negative_logits], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(positives), dtype=torch.long, device=states.device))


# --- The training loop on each worker ----------------------------------------------------------


def _configure_worker_logging() -> None:
    # Ray starts workers without a handler on the root logger, so INFO lines would be dropped.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    logger.setLevel(logging.INFO)


def _maybe_fail(epoch: int, rank: int, world_size: int) -> None:
    """Kill this worker once, during the epoch named by ``SEQREC_FAIL_WORKER_AT_EPOCH``."""
    setting = os.environ.get(FAIL_WORKER_ENV)
    if not setting or rank != world_size - 1:
        return
    fail_epoch, _, marker = setting.partition(":")
    if int(fail_epoch) != epoch or not marker or os.path.exists(marker):
        return
    with open(marker, "w") as file:
        file.write(f"worker {rank} killed during epoch {epoch}\n")
    logger.warning("Killing worker %d during epoch %d (%s is set)", rank, epoch, FAIL_WORKER_ENV)
    time.sleep(_FAILURE_DELAY_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _build_baselines(loop_config: dict, device: torch.device) -> dict[str, SequenceRanker]:
    baselines: dict[str, SequenceRanker] = {"popularity": PopularityRanker(loop_config["item_counts"])}
    itemcf = loop_config.get("itemcf")
    if itemcf is not None:
        baselines["itemcf"] = ItemCFRanker(
            len(loop_config["item_counts"]),
            itemcf["items"],
            itemcf["neighbors"],
            itemcf["similarities"],
            ItemCFConfig(**itemcf["config"]),
        )
    return {name: ranker.to(device) for name, ranker in baselines.items()}


def _train_epoch(model, ddp_model, optimizer, shard, config: TrainingConfig, epoch: int, num_negatives, device, rank, world_size):
    """Run one epoch of training steps; return (mean loss, sequences trained on by this worker, seconds)."""
    model.train()
    started = last_log = time.monotonic()
    loss_sum, steps, sequences = 0.0, 0, 0
    batches = shard.iter_batches(
        batch_size=config.batch_size,
        batch_format="pyarrow",
        local_shuffle_buffer_size=max(config.shuffle_buffer_rows, config.batch_size),
        local_shuffle_seed=config.seed + epoch * world_size + rank,
    )
    for batch in batches:
        hidden = ddp_model(_inputs(batch).to(device))  # (B, L, D)
        loss = next_item_loss(hidden, _matrix(batch, ex.TARGETS).to(device), model.item_embedding, num_negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item()
        steps += 1
        sequences += batch.num_rows
        if steps == 1:
            _maybe_fail(epoch, rank, world_size)
        now = time.monotonic()
        if rank == 0 and now - last_log >= config.log_interval_s:
            last_log = now
            logger.info(
                "epoch %d/%d step %d loss %.4f, %.0f sequences/s on rank 0",
                epoch,
                config.epochs,
                steps,
                loss_sum / steps,
                sequences / (now - started),
            )
    return loss_sum / max(steps, 1), sequences, time.monotonic() - started


def train_loop_per_worker(loop_config: dict) -> None:
    """Train on this worker's shard; rank 0 writes checkpoints and logs progress."""
    _configure_worker_logging()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = TrainingConfig(**loop_config["training"])
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed + rank)

    model = SASRec(SASRecConfig(**loop_config["model"]))
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    num_negatives = None if config.uses_full_softmax(model.num_items) else config.num_negatives
    sampler = (
        NegativeSampler(config.sampled_metrics, loop_config["item_counts"]) if config.sampled_metrics else None
    )

    state = {
        "epoch": 0,
        "stale_epochs": 0,
        "best": {"epoch": 0, "validation": {"ndcg@10": -1.0}, "test": {}, "elapsed_s": 0.0},
        "history": [],
        "elapsed_s": 0.0,
        "resumed_from_epochs": [],
    }
    best_model_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        saved, best_model_state = load_checkpoint(checkpoint)
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        rng_states = saved.pop("rng")
        set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
        state.update({name: saved[name] for name in state})
        state["resumed_from_epochs"].append(state["epoch"])
        if rank == 0:
            logger.info("Resumed from the checkpoint of epoch %d; training continues at epoch %d", state["epoch"], state["epoch"] + 1)

    shards = {name: ray.train.get_dataset_shard(name) for name in (ex.TRAIN, ex.VALIDATION, ex.TEST)}
    evaluate = functools.partial(
        evaluate_split,
        batch_size=config.eval_batch_size,
        rank=rank,
        world_size=world_size,
        device=device,
        sampler=sampler,
        exclude_seen=config.exclude_seen,
    )
    baselines = {
        name: {split: evaluate(ranker, shards[split]) for split in (ex.VALIDATION, ex.TEST)}
        for name, ranker in _build_baselines(loop_config, device).items()
    }

    for epoch in range(state["epoch"] + 1, config.epochs + 1):
        started = time.monotonic()
        train_loss, sequences, train_time_s = _train_epoch(
            model, ddp_model, optimizer, shards[ex.TRAIN], config, epoch, num_negatives, device, rank, world_size
        )
        total_sequences = _all_reduce_sums({"sequences": sequences}, ["sequences"], device)["sequences"]
        validation = evaluate(model, shards[ex.VALIDATION])
        epoch_time_s = time.monotonic() - started
        state["elapsed_s"] += epoch_time_s
        if validation["ndcg@10"] > state["best"]["validation"]["ndcg@10"]:
            test = evaluate(model, shards[ex.TEST])
            state["elapsed_s"] += time.monotonic() - started - epoch_time_s
            state["best"] = {"epoch": epoch, "validation": validation, "test": test, "elapsed_s": state["elapsed_s"]}
            best_model_state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
            state["stale_epochs"] = 0
        else:
            state["stale_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "validation": validation,
                "epoch_time_s": epoch_time_s,
                "train_time_s": train_time_s,
                "sequences": int(total_sequences),
                "sequences_per_s": total_sequences / train_time_s if train_time_s > 0 else 0.0,
            }
        )
        _report_epoch(model, optimizer, state, baselines, best_model_state, config, rank)
        if state["stale_epochs"] >= config.patience:
            if rank == 0:
                logger.info("Stopping early: no better validation NDCG@10 for %d epochs", state["stale_epochs"])
            break


def _report_epoch(model, optimizer, state: dict, baselines: dict, best_model_state, config: TrainingConfig, rank: int) -> None:
    """Log the epoch from rank 0 and report it to Ray Train; rank 0 attaches the checkpoint."""
    rng_states = gather_rng_states()
    entry = state["history"][-1]
    metrics = {"epoch": state["epoch"], "train_loss": entry["train_loss"], "validation": entry["validation"]}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    logger.info(
        "epoch %d/%d loss %.4f validation NDCG@10 %.4f HR@10 %.4f (best epoch %d) %.1fs, %.0f sequences/s",
        state["epoch"],
        config.epochs,
        entry["train_loss"],
        entry["validation"]["ndcg@10"],
        entry["validation"]["hr@10"],
        state["best"]["epoch"],
        entry["epoch_time_s"],
        entry["sequences_per_s"],
    )
    train_state = {
        **state,
        "baselines": baselines,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states,
    }
    report_with_checkpoint(metrics, train_state, best_model_state)


# --- The job on the driver ---------------------------------------------------------------------


def _itemcf_pairs(batch: pa.Table, window: int, own_events: int | None) -> pa.Table:
    # A training row's events are its inputs followed by its last target. Where windows overlap,
    # only the row's last ``own_events`` events count, so that no pair is counted twice.
    sequences = torch.cat([_matrix(batch, "item_ids"), _matrix(batch, ex.TARGETS)[:, -1:]], dim=1).numpy()
    if own_events is not None:
        sequences = sequences[:, -own_events:]
    items, neighbors, counts = count_cooccurrences(sequences, window)
    return pa.table({"item": items, "neighbor": neighbors, "count": counts})


def _without_empty_blocks(dataset: ray.data.Dataset) -> ray.data.Dataset | None:
    """Return a materialized dataset's Arrow blocks that contain rows, or None when there are none.

    NOTE: Ray Data 2.60's hash shuffle can receive a map task's empty output as a block without
    columns, and its reduce then fails to concatenate it with the others ("Schema at index 1 was
    different"). The Beauty file of BERT4Rec hit this in the ItemCF groupby.
    """
    refs = [entry.ref for bundle in dataset.iter_internal_ref_bundles() for entry in bundle.blocks if entry.metadata.num_rows]
    return ray.data.from_arrow_refs(refs) if refs else None


def build_itemcf(
    train: ray.data.Dataset,
    item_counts: np.ndarray,
    config: ItemCFConfig,
    num_partitions: int | None = None,
    own_events: int | None = None,
) -> dict:
    """Count co-occurrences in the training examples with Ray Data; return ItemCF's top neighbours.

    Pairs are grouped by their first item, so only the kept neighbours, at most
    ``neighbors_per_item`` per item, reach the driver.
    NOTE: a pair split across two training windows of one user is not counted.
    """

    def top_of_item(group: pa.Table) -> pa.Table:
        pairs = np.stack([group["item"].to_numpy(), group["neighbor"].to_numpy()], axis=1)
        unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=group["count"].to_numpy(), minlength=len(unique))
        items, neighbors, similarities = top_similarities(
            unique[:, 0], unique[:, 1], counts, item_counts, config.neighbors_per_item
        )
        return pa.table({"item": items, "neighbor": neighbors, "similarity": similarities})

    pairs = _without_empty_blocks(
        train.map_batches(
            _itemcf_pairs, fn_kwargs={"window": config.window, "own_events": own_events}, batch_format="pyarrow"
        ).materialize()
    )
    top_neighbors = pd.DataFrame()
    if pairs is not None:
        top_neighbors = pairs.groupby("item", num_partitions=num_partitions).map_groups(top_of_item, batch_format="pyarrow").to_pandas()
    if top_neighbors.empty:
        top_neighbors = pd.DataFrame({"item": [], "neighbor": [], "similarity": []})
    return {
        "items": top_neighbors["item"].to_numpy(np.int64),
        "neighbors": top_neighbors["neighbor"].to_numpy(np.int64),
        "similarities": top_neighbors["similarity"].to_numpy(np.float32),
        "config": dataclasses.asdict(config),
    }


def resolve_use_gpu(setting: str, num_workers: int) -> bool:
    """Decide whether the workers train on GPUs.

    NOTE: the tests check this choice against faked cluster resources. Training itself has run only
    on CPUs, so the GPU path (NCCL, CUDA tensors) is untested.
    """
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if setting == "yes" and gpus < num_workers:
        raise ValueError(
            f"--use-gpu yes needs {num_workers} GPUs but the Ray cluster has {gpus:g}; "
            "pass --use-gpu auto or no, or fewer --num-workers"
        )
    use_gpu = setting == "yes" or (setting == "auto" and gpus >= num_workers)
    logger.info("Training on %s (%g GPUs in the cluster, %d workers)", "GPUs" if use_gpu else "CPUs", gpus, num_workers)
    return use_gpu


def _warn_if_cpus_are_busy(num_workers: int) -> None:
    """Raise if the cluster can never fit the workers, and warn when their CPUs are busy now."""
    available = ray.available_resources().get("CPU", 0.0)
    total = ray.cluster_resources().get("CPU", 0.0)
    if total < num_workers:
        raise ValueError(
            f"the Ray cluster has {total:g} CPUs but training needs {num_workers} workers of 1 CPU; "
            "pass --num-workers with a smaller number"
        )
    if available < num_workers:
        logger.warning(
            "Training needs %d free CPUs for its workers but %.2g of %g are free; it waits until they are. "
            "Stop what holds them, for example Serve replicas (`serve shutdown`), or pass --num-workers.",
            num_workers,
            available,
            total,
        )


def _metrics_report(state: dict, examples: ex.Examples, config: TrainingConfig, wall_time_s: float) -> dict:
    """Build the contents of metrics.json from the final checkpoint's training state."""
    best, history = state["best"], state["history"]
    train_times = [entry["train_time_s"] for entry in history]
    sequences = [entry["sequences"] for entry in history]
    return {
        "protocol": "full ranking over all items; test metrics at the best validation epoch",
        "split": examples.split_rule,
        "best_epoch": best["epoch"],
        "epochs_run": state["epoch"],
        "sasrec": {"validation": best["validation"], "test": best["test"]},
        **state["baselines"],
        "users_evaluated": int(best[ex.TEST].get("count", 0)),
        "users_validated": int(best[ex.VALIDATION].get("count", 0)),
        "users_not_evaluated": {ex.VALIDATION: examples.num_users_not_validated, ex.TEST: examples.num_short_users},
        "users_too_short": examples.num_short_users,
        "sampled_metrics": dataclasses.asdict(config.sampled_metrics) if config.sampled_metrics else None,
        "exclude_seen": config.exclude_seen,
        "history": history,
        "resumed_from_epochs": state["resumed_from_epochs"],
        "timing": {
            "wall_time_s": wall_time_s,
            "training_time_s": state["elapsed_s"],
            "time_to_best_s": best["elapsed_s"],
            "sequences_per_s": sum(sequences) / sum(train_times) if sum(train_times) > 0 else 0.0,
        },
    }


def train(
    events_path: str,
    model_dir: str,
    model_options: dict | None = None,
    config: TrainingConfig | None = None,
    storage_path: str | None = None,
    split: ex.SplitConfig | None = None,
    itemcf: ItemCFConfig | None = None,
) -> str:
    """Run the whole training job and return the location of the artefact it wrote.

    Paths may be local or URIs. Ray Train checkpoints go to ``storage_path``, by default
    ``<model_dir>/ray_results``.
    """
    started = time.monotonic()
    config = config or TrainingConfig()
    split = split or ex.SplitConfig()
    itemcf = itemcf or ItemCFConfig()
    model_options = dict(model_options or {})
    sequence_length = model_options.pop("max_length", SEQUENCE_LENGTH)
    model_dir = storage.normalize(model_dir)
    version = new_version()

    examples = ex.build_examples(events_path, sequence_length, split=split, stride=config.window_stride)
    model_config = SASRecConfig(
        num_items=examples.item_vocab.size_with_padding,
        num_categories=examples.category_vocab.size_with_padding,
        max_length=sequence_length,
        **model_options,
    )
    use_gpu = resolve_use_gpu(config.use_gpu, config.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": dataclasses.asdict(model_config),
            "training": dataclasses.asdict(config),
            "item_counts": examples.train_item_counts,
            "itemcf": build_itemcf(
                examples.train,
                examples.train_item_counts,
                itemcf,
                ex.shuffle_partitions(examples.num_events),
                own_events=None if examples.stride is None else examples.stride + 1,
            ),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=f"sasrec-{version}",
            storage_path=storage_path or storage.join(model_dir, "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={ex.TRAIN: examples.train, ex.VALIDATION: examples.validation, ex.TEST: examples.test},
        dataset_config=ray.train.DataConfig(datasets_to_split=[ex.TRAIN]),
    )
    if not use_gpu:
        _warn_if_cpus_are_busy(config.num_workers)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {version} finished without a checkpoint; see the worker logs above")

    state, best_model = load_checkpoint(result.checkpoint)
    metrics = _metrics_report(state, examples, config, time.monotonic() - started)
    curve = training_curve_png(
        state["history"], {name: state["baselines"][name]["validation"] for name in state["baselines"]}, state["best"]["epoch"]
    )
    trending = trending_items(ray.data.read_parquet(storage.normalize(events_path)), examples.item_vocab)
    run_info = {
        "training": dataclasses.asdict(config),
        "itemcf": dataclasses.asdict(itemcf),
        "trending": {**dataclasses.asdict(TrendingConfig()), "items": len(trending)},
        "use_gpu": use_gpu,
        "data": {
            "events_path": str(events_path),
            "num_events": examples.num_events,
            "num_users": examples.num_users,
            "num_items": len(examples.item_vocab),
            "num_categories": len(examples.category_vocab),
            "split": examples.split_rule,
            "split_config": dataclasses.asdict(split),
            "cuts_s": examples.cuts_s,
        },
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
    }
    return write_artifact(
        model_dir,
        version,
        best_model,
        model_config,
        examples.item_vocab,
        examples.category_vocab,
        examples.train_item_counts,
        metrics,
        run_info,
        extra_files={"training_curve.png": curve},
        trending_items=trending,
    )


# --- Command line ------------------------------------------------------------------------------


def _unix_seconds(text: str) -> int:
    """Parse a cut time given as Unix seconds or an ISO 8601 time (UTC unless it names a zone)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}; give Unix seconds or ISO 8601, e.g. 2017-12-01T00:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a SASRec model on canonical events with Ray Train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--events", required=True, help="canonical events Parquet file or folder: a path or a URI")
    parser.add_argument("--model-dir", required=True, help="folder or URI of versioned model artefacts")
    parser.add_argument("--epochs", type=int, default=TrainingConfig.epochs, help="maximum number of epochs")
    parser.add_argument("--batch-size", type=int, default=TrainingConfig.batch_size, help="sequences per step and worker")
    parser.add_argument(
        "--window-stride", type=int, default=None, help="step between training windows; default: the sequence length"
    )
    parser.add_argument(
        "--shuffle-buffer-rows",
        type=int,
        default=TrainingConfig.shuffle_buffer_rows,
        help="rows each worker buffers to draw random training batches from, each epoch",
    )
    parser.add_argument("--learning-rate", type=float, default=TrainingConfig.learning_rate, help="AdamW step size")
    parser.add_argument("--weight-decay", type=float, default=TrainingConfig.weight_decay, help="AdamW weight decay")
    parser.add_argument("--patience", type=int, default=TrainingConfig.patience, help="epochs without improvement")
    parser.add_argument(
        "--loss", choices=("auto", "full", "sampled"), default="auto", help="softmax over all items or sampled"
    )
    parser.add_argument(
        "--num-negatives", type=int, default=TrainingConfig.num_negatives, help="negatives per batch, sampled loss"
    )
    parser.add_argument("--num-workers", type=int, default=TrainingConfig.num_workers, help="Ray Train workers")
    parser.add_argument(
        "--use-gpu",
        choices=("auto", "yes", "no"),
        default=TrainingConfig.use_gpu,
        help="train on GPUs: auto uses them when the cluster has one per worker",
    )
    parser.add_argument("--max-failures", type=int, default=TrainingConfig.max_failures, help="restarts from the latest checkpoint after a worker failure")
    parser.add_argument("--log-interval-s", type=float, default=TrainingConfig.log_interval_s, help="seconds between progress lines within an epoch")
    parser.add_argument("--hidden-size", type=int, default=SASRecConfig.hidden_size, help="model width D")
    parser.add_argument("--num-layers", type=int, default=SASRecConfig.num_layers, help="transformer layers")
    parser.add_argument("--num-heads", type=int, default=SASRecConfig.num_heads, help="attention heads")
    parser.add_argument("--feedforward-size", type=int, default=SASRecConfig.feedforward_size, help="feed-forward inner width (default 4 * hidden size)")
    parser.add_argument("--activation", choices=ACTIVATIONS, default=SASRecConfig.activation, help="feed-forward activation")
    parser.add_argument("--dropout", type=float, default=SASRecConfig.dropout, help="dropout rate")
    parser.add_argument(
        "--initializer-range",
        type=float,
        default=SASRecConfig.initializer_range,
        help="draw the blocks' linear weights from N(0, this standard deviation); default: PyTorch's start values",
    )
    parser.add_argument("--max-length", type=int, default=SEQUENCE_LENGTH, help="events per input sequence")
    parser.add_argument("--category", action=argparse.BooleanOptionalAction, default=SASRecConfig.use_category, help="category embedding")
    parser.add_argument("--behavior", action=argparse.BooleanOptionalAction, default=SASRecConfig.use_behavior, help="behaviour-type embedding")
    parser.add_argument(
        "--time-gap",
        action=argparse.BooleanOptionalAction,
        default=SASRecConfig.use_time_gap,
        help="embedding of the log2-bucketed seconds since the previous event",
    )
    parser.add_argument("--split", choices=(ex.LEAVE_ONE_OUT, ex.TEMPORAL), default=ex.LEAVE_ONE_OUT, help="how validation and test targets are held out")
    parser.add_argument("--validation-quantile", type=float, default=ex.SplitConfig.validation_quantile, help="temporal split: validation cut at this quantile of event times")
    parser.add_argument("--test-quantile", type=float, default=ex.SplitConfig.test_quantile, help="temporal split: test cut at this quantile of event times")
    parser.add_argument("--validation-time", type=_unix_seconds, default=None, help="temporal split: validation cut as Unix seconds or ISO 8601 (with --test-time; overrides the quantiles)")
    parser.add_argument("--test-time", type=_unix_seconds, default=None, help="temporal split: test cut as Unix seconds or ISO 8601")
    parser.add_argument("--sampled-metrics", choices=("uniform", "popularity"), default=None, help="also report metrics against sampled negatives from this sampler")
    parser.add_argument("--sampled-negatives", type=int, default=100, help="negatives per user for sampled metrics")
    parser.add_argument("--sampled-seed", type=int, default=0, help="seed of the sampled-metric negatives")
    parser.add_argument(
        "--exclude-seen",
        action="store_true",
        help="leave each user's input items out of that user's evaluation ranking",
    )
    parser.add_argument("--seed", type=int, default=TrainingConfig.seed, help="random seed")
    return parser


def parse_run(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict, TrainingConfig, ex.SplitConfig]:
    """Parse the command line into its namespace, the model options and the typed configs.

    Invalid settings exit with the parser's usage message and the rule they break.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sampled = (
            SampledMetricsConfig(args.sampled_metrics, args.sampled_negatives, args.sampled_seed)
            if args.sampled_metrics
            else None
        )
        config = TrainingConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            patience=args.patience,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            seed=args.seed,
            loss=args.loss,
            num_negatives=args.num_negatives,
            log_interval_s=args.log_interval_s,
            max_failures=args.max_failures,
            sampled_metrics=sampled,
            exclude_seen=args.exclude_seen,
            window_stride=args.window_stride,
            shuffle_buffer_rows=args.shuffle_buffer_rows,
        )
        split = ex.SplitConfig(
            kind=args.split,
            validation_quantile=args.validation_quantile,
            test_quantile=args.test_quantile,
            validation_time_s=args.validation_time,
            test_time_s=args.test_time,
        )
    except ValueError as error:
        parser.error(str(error))
    model_options = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "num_heads": args.num_heads,
        "feedforward_size": args.feedforward_size,
        "activation": args.activation,
        "dropout": args.dropout,
        "initializer_range": args.initializer_range,
        "max_length": args.max_length,
        "use_category": args.category,
        "use_behavior": args.behavior,
        "use_time_gap": args.time_gap,
    }
    return args, model_options, config, split


def main(argv: list[str] | None = None) -> None:
    args, model_options, config, split = parse_run(argv)
    logging.basicConfig(level=logging.INFO, format=_LOG_FORMAT)
    connect_ray()
    location = train(args.events, args.model_dir, model_options, config, split=split)
    metrics = storage.read_text(storage.join(location, "metrics.json"))
    print(f"Model artefact: {location}\n{metrics}")


if __name__ == "__main__":
    main()
