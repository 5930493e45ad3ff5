"""``mtrank predict`` on request-grouped data: `RankingModule.predict_step` scores the rows of one request with the
user's sequence encoded once (`mtrank.serve.score_rows_by_request`) and gives the plain forward's predictions."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

from encoders import HSTUEncoder, LongerEncoder, UltraHSTUEncoder
from heads import FRec, MMoE
from mtrank import serve
from mtrank.data.datamodule import RankingDataModule
from mtrank.data.synth import SynthConfig, generate
from mtrank.module import RankingModule

SYNTH = SynthConfig(num_users=30, num_items=40, history_mean=14, samples_per_user=12, max_len=8, seed=3)
ENCODERS = {
    "hstu": partial(HSTUEncoder, dim=16, num_layers=2, num_heads=2),
    "longer": partial(LongerEncoder, dim=16, num_layers=2, num_heads=2, merge_k=2, num_recent_queries=2),
    "ultra": partial(UltraHSTUEncoder, dim=16, num_layers=1, num_heads=2, local_window=4, global_prefix=1),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("requests")
    generate(SYNTH, out)
    return out


def predict(module: RankingModule, data_dir: Path, batch_size: int = 16) -> dict[str, torch.Tensor]:
    dm = RankingDataModule(
        str(data_dir), SYNTH.features(), SYNTH.tasks(), batch_size=batch_size, prefetch=0, predict="train.parquet"
    )
    outputs = quiet_trainer().predict(module, datamodule=dm)
    return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


def model(encoder: str, fatigue: bool = False, cache: bool = True) -> RankingModule:
    torch.manual_seed(0)
    frec = partial(FRec, category="category", recent=4, num_interests=2) if fatigue else None
    module = RankingModule(
        SYNTH.tasks(), SYNTH.features(), encoder=ENCODERS[encoder],
        heads=partial(MMoE, num_experts=2, expert_dims=(16,), tower_dims=(8,)), fatigue=frec, predict_cache=cache,
    )  # fmt: skip
    for p in module.parameters():  # zero-initialised parts (FRec's output) must matter too
        p.data.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize(("encoder", "fatigue"), [("hstu", False), ("longer", False), ("hstu", True)])
def test_grouped_prediction_equals_the_plain_forward(encoder: str, fatigue: bool, data_dir: Path, monkeypatch) -> None:
    calls = []
    original = serve.score_rows_by_request
    monkeypatch.setattr(serve, "score_rows_by_request", lambda *a: calls.append(1) or original(*a))
    cached = predict(model(encoder, fatigue), data_dir)
    assert calls, "the grouped path was not taken"
    taken = len(calls)
    plain = predict(model(encoder, fatigue, cache=False), data_dir)
    assert len(calls) == taken  # predict_cache=False: the plain forward
    assert set(cached) == set(plain)
    for key in plain:
        torch.testing.assert_close(cached[key].float(), plain[key].float(), atol=1e-5, rtol=1e-5, msg=key)


def test_requests_split_across_batches_are_exact(data_dir: Path) -> None:
    a = predict(model("hstu"), data_dir, batch_size=5)  # most requests hold 1-4 rows: many are split
    b = predict(model("hstu", cache=False), data_dir, batch_size=64)
    for key in ("sample_index", "click", "watch_time"):
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-5)


def test_uncached_encoders_and_request_candidates_keep_the_plain_path(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(serve, "score_rows_by_request", lambda *a: pytest.fail("grouped path taken"))
    predict(model("ultra"), data_dir)
    module = model("hstu")
    module.features = SYNTH.features()
    module.features.request_candidates = 4
    batch = next(iter(_loader(data_dir)))
    assert not module._predicts_by_request(batch)


def _loader(data_dir: Path):
    dm = RankingDataModule(
        str(data_dir), SYNTH.features(), SYNTH.tasks(), batch_size=8, prefetch=0, predict="train.parquet"
    )
    dm.setup("predict")
    return dm.predict_dataloader()


def test_score_rows_by_request_refuses_a_batch_without_request_id(data_dir: Path) -> None:
    import dataclasses

    batch = dataclasses.replace(next(iter(_loader(data_dir))), request_id=None)
    with pytest.raises(ValueError, match="no request_id"):
        serve.score_rows_by_request(serve.CandidateScorer(model("hstu")), batch)


def test_make_request_builds_the_loaders_history(data_dir: Path) -> None:
    import pyarrow.parquet as pq

    from mtrank.serve import CandidateScorer, make_request

    features = SYNTH.features()
    users = {row["user_id"]: row for row in pq.read_table(data_dir / "users.parquet").to_pylist()}
    batch = next(iter(_loader(data_dir)))
    module = model("hstu")
    scorer = CandidateScorer(module)
    for b in range(4):
        row = users[int(batch.user_id[b])]
        request = make_request(
            features, user_id=row["user_id"], ts=int(batch.ts[b]), history_item_id=row["hist_item_id"],
            history_ts=row["hist_ts"], history_sparse={k: row[f"hist_{k}"] for k in features.history_sparse},
            history_dense={k: row[f"hist_{k}"] for k in features.history_dense},
            user_sparse={k: row[k] for k in features.user_sparse}, user_dense={k: row[k] for k in features.user_dense},
        )  # fmt: skip
        n = int(batch.history_len[b])
        assert int(request.history_len[0]) == n
        torch.testing.assert_close(request.history_item_id[0, :n], batch.history_item_id[b, :n].long())
        torch.testing.assert_close(request.history_ts[0, :n], batch.history_ts[b, :n].long())
        sparse = {k: v[b : b + 1] for k, v in batch.item_sparse.items()}
        dense = {k: v[b : b + 1] for k, v in batch.item_dense.items()}
        scores = scorer.score_user(request, item_id=batch.item_id[b : b + 1], item_sparse=sparse, item_dense=dense)
        with torch.no_grad():
            want = module.predictions(module(batch)[1])
        torch.testing.assert_close(scores["click"][0], want["click"][b], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"history_sparse: expected \['action', 'category'\]"):
        make_request(features, user_id=0, ts=1, history_item_id=[1], history_ts=[0], history_sparse={"category": [1]})
