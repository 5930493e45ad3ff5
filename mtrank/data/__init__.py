"""mtrank's data layer: Parquet users/samples tables -> schema check -> time-sliced histories -> `Batch`.

- `mtrank.data.store.UserStore`: the users table as memory-mapped CSR arrays.
- `mtrank.data.dataset.HistoryDataset`, `ShardedBatchSampler`, `make_loader`: the hot path.
- `mtrank.data.lengths.LengthSampling`, `BalancedLengthSampler`: stochastic history lengths in
  token-balanced training batches.
- `mtrank.data.schema.check_schema`, `SchemaError`: validation before training.
- `mtrank.data.synth`: synthetic data with planted effects (``mtrank synth``).
- `mtrank.data.datamodule.RankingDataModule`: the LightningDataModule.
"""

from mtrank.data.dataset import CutBatch, HistoryDataset, ShardedBatchSampler, make_loader, padded_width
from mtrank.data.lengths import BalancedLengthSampler, LengthSampling, assign_balanced, draw_cut_lengths
from mtrank.data.schema import SchemaError, check_schema
from mtrank.data.store import UserStore
from mtrank.data.synth import SynthConfig, generate

__all__ = [
    "BalancedLengthSampler",
    "CutBatch",
    "HistoryDataset",
    "LengthSampling",
    "SchemaError",
    "ShardedBatchSampler",
    "SynthConfig",
    "UserStore",
    "assign_balanced",
    "check_schema",
    "draw_cut_lengths",
    "generate",
    "make_loader",
    "padded_width",
]
