"""Ray Train entry point: build examples, train SASRec with DDP on CPU workers, write an artefact.

Run it on a laptop or submit it to a cluster unchanged::

    ray job submit --working-dir . -- python -m training.train --events /data/events.parquet \\
        --model-dir /data/models

Each epoch validates with full-ranking metrics, saves a checkpoint (model, optimizer, epoch and
RNG state) and stops early when validation NDCG@10 stops improving. Test metrics are those of the
best validation epoch. The popularity baseline is evaluated on the same split.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
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
from training.cluster import connect_ray
from training.evaluation import add_sums, evaluate_batch, means
from training.models import PopularityRanker, SASRec, SASRecConfig, SequenceBatch, SequenceRanker
from training.schema import PADDING_ID, SEQUENCE_LENGTH, USER_ID

logger = logging.getLogger(__name__)

MODEL_STATE_FILE = "best_model.pt"
TRAIN_STATE_FILE = "train_state.pt"


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
    seed: int = 0
    loss: Literal["auto", "full", "sampled"] = "auto"
    """Full-softmax cross-entropy, or sampled softmax against shared uniform negatives. ``auto``
    picks full softmax up to ``full_softmax_max_items`` items."""
    num_negatives: int = 2048
    full_softmax_max_items: int = 10_000

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.loss not in ("auto", "full", "sampled"):
            raise ValueError(f"loss must be 'auto', 'full' or 'sampled', got {self.loss!r}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}")

    def uses_full_softmax(self, num_items: int) -> bool:
        return self.loss == "full" or (self.loss == "auto" and num_items <= self.full_softmax_max_items)


def _matrix(batch: pa.Table, column: str) -> torch.Tensor:
    """Convert a fixed-size list column to a (B, L) int64 tensor."""
    values = batch[column].combine_chunks().flatten().to_numpy()
    return torch.from_numpy(values.astype(np.int64, copy=True).reshape(batch.num_rows, -1))


def _inputs(batch: pa.Table) -> SequenceBatch:
    return SequenceBatch(*(_matrix(batch, name) for name in ex.INPUT_COLUMNS))


def evaluate_split(ranker: SequenceRanker, shard, batch_size: int, rank: int, world_size: int) -> dict[str, float]:
    """Full-ranking metrics over one split; each worker ranks the users with ``user_id % world_size == rank``."""
    ranker.eval()
    sums: dict[str, float] = {}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"):
        batch = batch.filter(pa.array(batch[USER_ID].to_numpy() % world_size == rank))
        if batch.num_rows:
            add_sums(sums, evaluate_batch(ranker, _inputs(batch), _matrix(batch, ex.TARGETS)[:, -1]))
    return means(_all_reduce_sums(sums))


def _all_reduce_sums(sums: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    names = ["count", "hr@10", "recall@10", "ndcg@10", "hr@20", "recall@20", "ndcg@20", "mrr"]
    values = torch.tensor([sums.get(name, 0.0) for name in names], dtype=torch.float64)
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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def train_loop_per_worker(loop_config: dict) -> None:
    """Train on this worker's shard; rank 0 writes checkpoints and logs one line per epoch."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config = TrainingConfig(**loop_config["training"])
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed)

    model = SASRec(SASRecConfig(**loop_config["model"]))
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    popularity = PopularityRanker(loop_config["item_counts"])
    num_negatives = None if config.uses_full_softmax(model.num_items) else config.num_negatives

    start_epoch, stale_epochs = 0, 0
    best: dict = {"epoch": -1, "validation": {"ndcg@10": -1.0}, "test": {}}
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAIN_STATE_FILE, weights_only=False)
            best_state = torch.load(Path(folder) / MODEL_STATE_FILE, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, stale_epochs, best = state["epoch"] + 1, state["stale_epochs"], state["best"]
        if rank == 0:
            logger.info("Resumed from the checkpoint of epoch %d", state["epoch"] + 1)

    train_shard = ray.train.get_dataset_shard(ex.TRAIN)
    validation_shard = ray.train.get_dataset_shard(ex.VALIDATION)
    test_shard = ray.train.get_dataset_shard(ex.TEST)
    baseline = {
        "validation": evaluate_split(popularity, validation_shard, config.eval_batch_size, rank, world_size),
        "test": evaluate_split(popularity, test_shard, config.eval_batch_size, rank, world_size),
    }

    for epoch in range(start_epoch, config.epochs):
        started = time.monotonic()
        model.train()
        loss_sum, steps = 0.0, 0
        for batch in train_shard.iter_batches(
            batch_size=config.batch_size, batch_format="pyarrow", local_shuffle_buffer_size=4 * config.batch_size
        ):
            hidden = ddp_model(_inputs(batch))  # (B, L, D)
            loss = next_item_loss(hidden, _matrix(batch, ex.TARGETS), model.item_embedding, num_negatives)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            steps += 1

        validation = evaluate_split(model, validation_shard, config.eval_batch_size, rank, world_size)
        if validation["ndcg@10"] > best["validation"]["ndcg@10"]:
            test = evaluate_split(model, test_shard, config.eval_batch_size, rank, world_size)
            best = {"epoch": epoch + 1, "validation": validation, "test": test}
            best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
            stale_epochs = 0
        else:
            stale_epochs += 1

        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(steps, 1),
            "epoch_time_s": time.monotonic() - started,
            "validation": validation,
            "best": best,
            "popularity": baseline,
        }
        if rank == 0:
            logger.info(
                "epoch %d/%d loss %.4f validation NDCG@10 %.4f HR@10 %.4f (best epoch %d) %.1fs",
                epoch + 1,
                config.epochs,
                metrics["train_loss"],
                validation["ndcg@10"],
                validation["hr@10"],
                best["epoch"],
                metrics["epoch_time_s"],
            )
            with tempfile.TemporaryDirectory() as folder:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "stale_epochs": stale_epochs,
                        "best": best,
                        "rng": _rng_state(),
                    },
                    Path(folder) / TRAIN_STATE_FILE,
                )
                torch.save(best_state, Path(folder) / MODEL_STATE_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics, checkpoint=None)
        if stale_epochs >= config.patience:
            if rank == 0:
                logger.info("Stopping early: no better validation NDCG@10 for %d epochs", stale_epochs)
            break


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


def train(
    events_path: str,
    model_dir: str,
    model_options: dict | None = None,
    config: TrainingConfig | None = None,
    storage_path: str | None = None,
) -> str:
    """Run the whole training job and return the location of the artefact it wrote.

    Paths may be local or URIs. Ray Train checkpoints go to ``storage_path``, by default
    ``<model_dir>/ray_results``.
    """
    config = config or TrainingConfig()
    model_options = dict(model_options or {})
    sequence_length = model_options.pop("max_length", SEQUENCE_LENGTH)
    model_dir = storage.normalize(model_dir)
    version = new_version()

    examples = ex.build_examples(events_path, sequence_length)
    model_config = SASRecConfig(
        num_items=examples.item_vocab.size_with_padding,
        num_categories=examples.category_vocab.size_with_padding,
        max_length=sequence_length,
        **model_options,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": dataclasses.asdict(model_config),
            "training": dataclasses.asdict(config),
            "item_counts": examples.train_item_counts,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=f"sasrec-{version}",
            storage_path=storage_path or storage.join(model_dir, "ray_results"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={ex.TRAIN: examples.train, ex.VALIDATION: examples.validation, ex.TEST: examples.test},
        dataset_config=ray.train.DataConfig(datasets_to_split=[ex.TRAIN]),
    )
    _warn_if_cpus_are_busy(config.num_workers)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {version} finished without a checkpoint; see the worker logs above")

    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / TRAIN_STATE_FILE, weights_only=False)
        best_model = torch.load(Path(folder) / MODEL_STATE_FILE, weights_only=True)
    best = state["best"]
    metrics = {
        "protocol": "leave-one-out by time, full ranking over all items, test at the best validation epoch",
        "best_epoch": best["epoch"],
        "sasrec": {"validation": best["validation"], "test": best["test"]},
        "popularity": result.metrics["popularity"],
        "users_evaluated": int(best["test"].get("count", 0)),
        "users_too_short": examples.num_short_users,
    }
    run_info = {
        "training": dataclasses.asdict(config),
        "data": {
            "events_path": str(events_path),
            "num_events": examples.num_events,
            "num_users": examples.num_users,
            "num_items": len(examples.item_vocab),
            "num_categories": len(examples.category_vocab),
            "split": f"leave-one-out; users with fewer than {ex.MIN_EVENTS_TO_EVALUATE} events train only",
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
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a SASRec model on canonical events with Ray Train.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--events", required=True, help="canonical events Parquet file or folder: a path or a URI")
    parser.add_argument("--model-dir", required=True, help="folder or URI of versioned model artefacts")
    parser.add_argument("--epochs", type=int, default=TrainingConfig.epochs, help="maximum number of epochs")
    parser.add_argument("--batch-size", type=int, default=TrainingConfig.batch_size, help="sequences per step")
    parser.add_argument("--learning-rate", type=float, default=TrainingConfig.learning_rate, help="AdamW step size")
    parser.add_argument("--patience", type=int, default=TrainingConfig.patience, help="epochs without improvement")
    parser.add_argument(
        "--loss", choices=("auto", "full", "sampled"), default="auto", help="softmax over all items or sampled"
    )
    parser.add_argument(
        "--num-negatives", type=int, default=TrainingConfig.num_negatives, help="negatives per batch, sampled loss"
    )
    parser.add_argument("--num-workers", type=int, default=TrainingConfig.num_workers, help="Ray Train workers")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width D")
    parser.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout rate")
    parser.add_argument("--max-length", type=int, default=SEQUENCE_LENGTH, help="events per input sequence")
    parser.add_argument("--no-category", action="store_true", help="train without category embeddings")
    parser.add_argument("--no-behavior", action="store_true", help="train without behaviour embeddings")
    parser.add_argument("--seed", type=int, default=TrainingConfig.seed, help="random seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = TrainingConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        patience=args.patience,
        num_workers=args.num_workers,
        seed=args.seed,
        loss=args.loss,
        num_negatives=args.num_negatives,
    )
    model_options = {
        "hidden_size": args.hidden_size,
        "num_layers": args.num_layers,
        "dropout": args.dropout,
        "max_length": args.max_length,
        "use_category": not args.no_category,
        "use_behavior": not args.no_behavior,
    }
    connect_ray()
    location = train(args.events, args.model_dir, model_options, config)
    metrics = storage.read_text(storage.join(location, "metrics.json"))
    print(f"Model artefact: {location}\n{metrics}")


if __name__ == "__main__":
    main()
