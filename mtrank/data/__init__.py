"""mtrank's data layer: Parquet users/samples tables -> schema check -> time-sliced histories -> `Batch`.

- `mtrank.data.store.UserStore`: the users table as memory-mapped CSR arrays.
- `mtrank.data.dataset.HistoryDataset`, `ShardedBatchSampler`, `make_loader`: the hot path.
- `mtrank.data.schema.check_schema`, `SchemaError`: validation before training.
- `mtrank.data.synth`: synthetic data with planted effects (``mtrank synth``).
- `mtrank.data.datamodule.RankingDataModule`: the LightningDataModule.
"""

from mtrank.data.dataset import HistoryDataset, ShardedBatchSampler, make_loader
from mtrank.data.schema import SchemaError, check_schema
from mtrank.data.store import UserStore
from mtrank.data.synth import SynthConfig, generate

__all__ = [
    "HistoryDataset",
    "SchemaError",
    "ShardedBatchSampler",
    "SynthConfig",
    "UserStore",
    "check_schema",
    "generate",
    "make_loader",
]
