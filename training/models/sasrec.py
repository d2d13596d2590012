"""SASRec-style causal transformer for next-item prediction, with optional side information.

Shapes: B batch, L sequence length, D hidden size, N item index space (padding included).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from training.models.base import SequenceBatch, SequenceRanker
from training.schema import BEHAVIORS, PADDING_ID

# Time-gap bucket 0 is padding, and bucket 1 an event without a known predecessor: the first event
# of a sequence, or any event when the batch has no timestamps. A gap of g seconds falls in bucket
# 2 + floor(log2(g + 1)), capped at the last bucket.
FIRST_EVENT_GAP_BUCKET = 1
DEFAULT_TIME_GAP_BUCKETS = 32
ACTIVATIONS = ("gelu", "relu")


def time_gap_buckets(item_ids: torch.Tensor, timestamps_s: torch.Tensor | None, num_buckets: int) -> torch.Tensor:
    """Bucket the gap between each event and the one before it in its row: (B, L) int64.

    Rows are left-padded, so the predecessor of position t is position t - 1 when that contains an item.
    """
    is_item = item_ids != PADDING_ID
    buckets = torch.full_like(item_ids, FIRST_EVENT_GAP_BUCKET)
    if timestamps_s is not None:
        gaps_s = (timestamps_s[:, 1:] - timestamps_s[:, :-1]).clamp(min=0).double()  # (B, L - 1)
        log_buckets = (2 + torch.floor(torch.log2(gaps_s + 1))).long().clamp(max=num_buckets - 1)
        has_predecessor = is_item[:, :-1] & is_item[:, 1:]
        buckets[:, 1:] = torch.where(has_predecessor, log_buckets, FIRST_EVENT_GAP_BUCKET)
    return buckets.masked_fill(~is_item, PADDING_ID)


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
    """Architecture of a SASRec model. Vocabulary sizes include the padding index 0."""

    num_items: int
    num_categories: int
    max_length: int = 50
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    feedforward_size: int | None = None
    """Inner width of each block's feed-forward layer. None gives 4 * hidden_size."""
    activation: str = "gelu"
    """Feed-forward activation: "gelu" or "relu"."""
    dropout: float = 0.2
    initializer_range: float | None = None
    """Standard deviation of the normal draw for the blocks' linear weights, whose biases then start at
    0. None keeps PyTorch's own start values."""
    use_category: bool = True
    use_behavior: bool = True
    use_time_gap: bool = False
    """Add an embedding of the bucketed time since the previous event (see ``time_gap_buckets``)."""
    num_time_gap_buckets: int = DEFAULT_TIME_GAP_BUCKETS

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(f"num_items must count padding and at least one item, got {self.num_items}")
        if self.num_categories < 1:
            raise ValueError(f"num_categories must be at least 1 (padding), got {self.num_categories}")
        for name in ("max_length", "hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.feedforward_size is not None and self.feedforward_size < 1:
            raise ValueError(f"invalid feedforward_size {self.feedforward_size}: pass a width of at least 1, or None for 4 * hidden_size")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"invalid activation {self.activation!r}: pass one of {ACTIVATIONS}")
        if self.num_time_gap_buckets < 3:
            raise ValueError(f"num_time_gap_buckets must be at least 3, got {self.num_time_gap_buckets}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.initializer_range is not None and not self.initializer_range > 0:
            raise ValueError(
                f"invalid initializer_range {self.initializer_range}: pass a positive standard deviation such as 0.02, or None"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class SASRec(SequenceRanker):
    """Causal self-attention over a user's events; item embeddings are shared with the output layer."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.num_items = config.num_items
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.num_items, d, padding_idx=PADDING_ID)
        self.position_embedding = nn.Embedding(config.max_length, d)
        self.category_embedding = (
            nn.Embedding(config.num_categories, d, padding_idx=PADDING_ID) if config.use_category else None
        )
        self.behavior_embedding = (
            nn.Embedding(len(BEHAVIORS) + 1, d, padding_idx=PADDING_ID) if config.use_behavior else None
        )
        self.time_gap_embedding = (
            nn.Embedding(config.num_time_gap_buckets, d, padding_idx=PADDING_ID) if config.use_time_gap else None
        )
        self.input_dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(
            d_model=d,
            nhead=config.num_heads,
            dim_feedforward=config.feedforward_size or 4 * d,
            dropout=config.dropout,
            activation=config.activation,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.output_norm = nn.LayerNorm(d)
        if config.initializer_range is not None:
            for module in self.encoder.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=config.initializer_range)
                    nn.init.zeros_(module.bias)
        # Position and side-information vectors start from N(0, 0.02), as item vectors do. PyTorch's
        # N(0, 1) would make them about six times the scaled item vectors at width 64. In the benchmarks
        # that slowed the first epochs for positions and lowered test HR@10 for Beauty categories.
        for embedding in self.input_embeddings():
            nn.init.normal_(embedding.weight, std=0.02)
            if embedding.padding_idx is not None:
                with torch.no_grad():
                    embedding.weight[embedding.padding_idx].zero_()

    def input_embeddings(self) -> list[nn.Embedding]:
        """Return the embeddings summed into each position's input: item, position and the switched-on side information."""
        tables = [self.item_embedding, self.position_embedding]
        tables += [self.category_embedding, self.behavior_embedding, self.time_gap_embedding]
        return [table for table in tables if table is not None]

    def hidden_states(self, batch: SequenceBatch) -> torch.Tensor:
        """Contextual state at every position: (B, L, D). Position t attends only to positions up to t."""
        item_ids = batch.item_ids
        length = item_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.config.max_length}")
        is_item = item_ids != PADDING_ID  # (B, L)

        # Positions count from the row's first event. A prefix then gets the same positions in a
        # training row as when it is served alone, and padding does not shift them.
        positions = (is_item.cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        x = self.item_embedding(item_ids) * self.config.hidden_size**0.5 + self.position_embedding(positions)
        if self.category_embedding is not None:
            x = x + self.category_embedding(batch.category_ids)
        if self.behavior_embedding is not None:
            x = x + self.behavior_embedding(batch.behaviors)
        if self.time_gap_embedding is not None:
            buckets = time_gap_buckets(item_ids, batch.timestamps_s, self.config.num_time_gap_buckets)
            x = x + self.time_gap_embedding(buckets)
        x = self.input_dropout(x) * is_item.unsqueeze(-1)

        # Query t may attend to key s when s <= t and s is an item. Each position may also attend
        # to itself, so padded rows stay finite; their outputs are never read.
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=item_ids.device))
        allowed = causal & (is_item.unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=item_ids.device))
        blocked = ~allowed.repeat_interleave(self.config.num_heads, dim=0)  # (B * heads, L, L)
        x = self.encoder(x, mask=blocked)
        return self.output_norm(x) * is_item.unsqueeze(-1)

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        return self.hidden_states(batch)

    def encode(self, batch: SequenceBatch) -> torch.Tensor:
        """User state from the most recent event: (B, D)."""
        return self.hidden_states(batch)[:, -1]

    def score_all(self, state: torch.Tensor) -> torch.Tensor:
        scores = state @ self.item_embedding.weight.T  # (B, N)
        scores[:, PADDING_ID] = float("-inf")
        return scores

    def item_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight

    def _score_candidates(self, state: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bcd->bc", state, self.item_embedding(candidates))
