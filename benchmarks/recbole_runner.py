"""Train RecBole 1.2.1's SASRec on an atomic data set and print its figures as JSON.

Runs under the RecBole environment (benchmarks/recbole_env.sh), never under the project's own,
and is started by benchmarks/models.py, which passes the settings. It calls RecBole's Config,
create_dataset, data_preparation and Trainer directly, because RecBole's quick_start module imports
Ray 2.6 or older. The protocol matches seqrec's: leave-one-out by time ('LS': 'valid_and_test',
order 'TO'), full ranking over all items, early stopping on validation NDCG@10, test metrics of the
best validation epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed


class TimeBudgetExceeded(Exception):
    """Raised at the start of an epoch once training has run for its time budget."""


class TimedTrainer(Trainer):
    """RecBole's Trainer, recording the time and validation NDCG@10 of every epoch.

    With a time budget, no epoch starts after the budget is spent; the best checkpoint so far is kept.
    """

    def __init__(self, config, model, time_budget_s: float | None) -> None:
        super().__init__(config, model)
        self.fit_started = time.monotonic()
        self.time_budget_s = time_budget_s
        self.history: list[dict] = []

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        started = time.monotonic()
        if self.time_budget_s is not None and started - self.fit_started >= self.time_budget_s:
            raise TimeBudgetExceeded(f"stopped before epoch {epoch_idx + 1} after {started - self.fit_started:.0f}s")
        loss = super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)
        self.history.append(
            {"epoch": epoch_idx + 1, "train_time_s": time.monotonic() - started, "train_loss": float(loss)}
        )
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        started = time.monotonic()
        score, result = super()._valid_epoch(valid_data, show_progress)
        # Validation inside fit() follows the epoch's training; evaluate() on the test set does not.
        if self.history and "validation_ndcg@10" not in self.history[-1]:
            self.history[-1].update(
                {
                    "validation_time_s": time.monotonic() - started,
                    "validation_ndcg@10": float(result["ndcg@10"]),
                    "validation_hr@10": float(result["hit@10"]),
                    "elapsed_s": time.monotonic() - self.fit_started,
                }
            )
        return score, result


def recbole_config(args: argparse.Namespace, data_path: Path, checkpoint_dir: str) -> dict:
    return {
        "data_path": str(data_path),
        "checkpoint_dir": checkpoint_dir,
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": args.max_length,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["NDCG", "Hit"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "hidden_size": args.hidden_size,
        "inner_size": 4 * args.hidden_size,
        "n_layers": args.num_layers,
        "n_heads": args.num_heads,
        "hidden_dropout_prob": args.dropout,
        "attn_dropout_prob": args.dropout,
        "epochs": args.epochs,
        "stopping_step": args.patience,
        "learning_rate": args.learning_rate,
        "train_batch_size": args.batch_size,
        "eval_batch_size": 4096,
        "seed": args.seed,
        "reproducibility": True,
        "use_gpu": False,
        "device": "cpu",
        "worker": 0,
        "show_progress": False,
        "log_wandb": False,
        "state": "WARNING",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Train RecBole's SASRec and print its figures as JSON.")
    parser.add_argument("--data-dir", required=True, help="folder holding <dataset>.inter in RecBole's atomic format")
    parser.add_argument("--dataset", required=True, help="RecBole data set name: the stem of the .inter file")
    parser.add_argument("--output", required=True, help="JSON file to write the figures to")
    parser.add_argument("--threads", type=int, required=True, help="torch CPU threads")
    parser.add_argument("--max-length", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--num-heads", type=int, default=2, help="attention heads")
    parser.add_argument("--dropout", type=float, default=0.5, help="hidden and attention dropout rate")
    parser.add_argument("--epochs", type=int, default=200, help="maximum number of epochs")
    parser.add_argument("--patience", type=int, default=10, help="epochs without a better validation NDCG@10")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step size")
    parser.add_argument("--batch-size", type=int, default=2048, help="training sequences per step")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--time-budget-s", type=float, help="start no epoch after this many seconds of training")
    args = parser.parse_args()
    # RecBole's Config also parses sys.argv for '--key=value' settings; this script's own options are not RecBole's.
    sys.argv = sys.argv[:1]
    logging.basicConfig(level=logging.WARNING)

    source = Path(args.data_dir, f"{args.dataset}.inter")
    if not source.is_file():
        sys.exit(f"RecBole atomic file not found: {source}")
    with tempfile.TemporaryDirectory(prefix="recbole-") as workdir:
        # RecBole reads <data_path>/<dataset>/<dataset>.inter; a link avoids copying the data.
        data_path = Path(workdir, "data")
        data_path.mkdir()
        os.symlink(Path(args.data_dir).resolve(), data_path / args.dataset)
        config = Config(
            model="SASRec",
            dataset=args.dataset,
            config_dict=recbole_config(args, data_path, str(Path(workdir, "checkpoints"))),
        )
        init_seed(config["seed"], config["reproducibility"])
        torch.set_num_threads(args.threads)

        started = time.monotonic()
        dataset = create_dataset(config)
        train_data, valid_data, test_data = data_preparation(config, dataset)
        prepared_s = time.monotonic() - started
        model = SASRec(config, train_data.dataset).to(config["device"])
        trainer = TimedTrainer(config, model, args.time_budget_s)
        stopped_by_budget = False
        try:
            trainer.fit(train_data, valid_data, saved=True, show_progress=False)
        except TimeBudgetExceeded as stop:
            logging.warning("RecBole training %s (time budget %.0fs)", stop, args.time_budget_s)
            stopped_by_budget = True
        fit_s = time.monotonic() - trainer.fit_started
        # RecBole 1.2.1 loads its best checkpoint with torch.load's default weights_only=True, which
        # torch 2.6 and later reject for that file. This process wrote the file, so it is loaded here.
        checkpoint = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["state_dict"])
        model.load_other_parameter(checkpoint.get("other_parameter"))
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)

        uid_field, iid_field = dataset.uid_field, dataset.iid_field
        test_users = dataset.id2token(uid_field, test_data.dataset.inter_feat[uid_field].numpy())
        test_items = dataset.id2token(iid_field, test_data.dataset.inter_feat[iid_field].numpy())

    history = trainer.history
    best = max((epoch for epoch in history if "validation_ndcg@10" in epoch), key=lambda e: e["validation_ndcg@10"])
    figures = {
        "recbole_version": __import__("recbole").__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {key: config[key] for key in ("MAX_ITEM_LIST_LENGTH", "hidden_size", "inner_size", "n_layers",
                                                  "n_heads", "hidden_dropout_prob", "attn_dropout_prob", "loss_type",
                                                  "learning_rate", "train_batch_size", "epochs", "stopping_step",
                                                  "eval_args", "valid_metric")},
        "num_users": int(dataset.user_num - 1),
        "num_items": int(dataset.item_num - 1),
        "train_sequences": len(train_data.dataset),
        "prepare_time_s": prepared_s,
        "fit_time_s": fit_s,
        "epochs_run": len(history),
        "stopped_by_time_budget": stopped_by_budget,
        "time_budget_s": args.time_budget_s,
        "best_epoch": best["epoch"],
        "time_to_best_s": best["elapsed_s"],
        "validation": {"ndcg@10": best["validation_ndcg@10"], "hr@10": best["validation_hr@10"]},
        "test": {"ndcg@10": float(test["ndcg@10"]), "hr@10": float(test["hit@10"]), "count": len(test_users)},
        "history": history,
        "test_targets": {str(user): str(item) for user, item in zip(test_users, test_items)},
    }
    Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
