"""Serving (`mtrank.serve`): cached candidate scoring equals the training-time forward on (user, candidate) pairs,
for HSTU (prefix cache), LONGER (KV cache) and the re-encoding fallback; batching, microbatching, masking,
branches (fatigue, uplift), input checks; HSTU's prefix cache at the encoder level."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import pytest
import torch
from helpers import FEATURES

from encoders import HSTUEncoder, LongerEncoder, MeanPoolEncoder, UltraHSTUEncoder
from heads import CDUM, PLE, FRec, MMoE
from mtrank.batch import Batch
from mtrank.data.synth import random_batch
from mtrank.module import RankingModule
from mtrank.serve import Candidates, CandidateScorer, pair_batch, score_by_reencoding, scoring_path
from mtrank.spec import FeatureSpec, TaskSpec

TASKS = [
    TaskSpec(name="click"),
    TaskSpec(name="like"),
    TaskSpec(name="watch_time", kind="regression", loss="log_mse"),
    TaskSpec(name="watch_raw", label="watch_time", kind="regression"),  # mse: the raw output, never clamped
]
LENGTHS = [0, 1, 3, 8, 5]  # history lengths of the requests: empty, one behaviour, ..., max_len
C = 7
# valid candidates per request: all, a prefix, holes, a single one, none
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 1],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)

SMALL = {"dim": 16, "num_layers": 2, "num_heads": 2, "output_dim": 12}
ENCODERS: dict[str, tuple[Callable, str]] = {  # name -> (factory, expected path)
    "hstu_num_keys": (partial(HSTUEncoder, **SMALL, attention_norm="num_keys", num_position_buckets=4), "hstu_prefix"),
    "hstu_max_len": (partial(HSTUEncoder, **SMALL, attention_norm="max_len"), "hstu_prefix"),
    "hstu_no_bias": (
        partial(HSTUEncoder, **SMALL, position_embedding=False, num_position_buckets=0, num_time_buckets=0),
        "hstu_prefix",
    ),
    "longer_k1": (
        partial(LongerEncoder, **SMALL, num_learned_global_tokens=2, merge_k=1, num_recent_queries=2),
        "longer_cache",
    ),
    "longer_k4": (
        partial(LongerEncoder, **SMALL, num_learned_global_tokens=2, merge_k=4, num_recent_queries=2),
        "longer_cache",
    ),
    "ultra_hstu": (partial(UltraHSTUEncoder, **SMALL, num_context_tokens=1, local_window=3), "reencode"),
    "mean_pool": (partial(MeanPoolEncoder, dim=16, output_dim=12), "reencode"),
}
MMOE = partial(MMoE, num_experts=2, expert_dims=(16,), tower_dims=(8,))


def make_module(
    encoder: str, heads: Callable = MMOE, features: FeatureSpec = FEATURES, seed: int = 0, **branches
) -> RankingModule:
    """A RankingModule with every parameter perturbed (zero-initialised parts such as FRec's output and CDUM's
    uplift towers then matter too), in eval mode."""
    torch.manual_seed(seed)
    module = RankingModule(TASKS, features, encoder=ENCODERS[encoder][0], heads=heads, **branches)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return module.eval()


def make_request(
    lengths: list[int] = LENGTHS, width: int = 8, seed: int = 0, features: FeatureSpec = FEATURES
) -> Batch:
    """Requests with the given history lengths, each at its own time (history times shifted along)."""
    batch = random_batch(features, lengths, width, seed)
    shift = torch.arange(len(lengths)) * 5000
    mask = batch.history_mask()
    return dataclasses.replace(batch, ts=batch.ts + shift, history_ts=(batch.history_ts + shift[:, None]) * mask)


def make_candidates(B: int = len(LENGTHS), seed: int = 1, mask: torch.Tensor | None = MASK) -> Candidates:
    g = torch.Generator().manual_seed(seed)
    return Candidates(
        item_id=torch.randint(0, FEATURES.num_items, (B, C), generator=g),
        item_sparse={"category": torch.randint(0, 6, (B, C), generator=g)},
        item_dense={"duration": torch.rand(B, C, generator=g) * 60},
        mask=mask if mask is None else mask[:B],
    )


def request_fields(cands: Candidates, size: int) -> dict:
    """Each pair's request candidate set, by loops: itself, then the request's other valid candidates in order."""
    B = cands.item_id.shape[0]
    mask = cands.mask if cands.mask is not None else torch.ones(B, C, dtype=torch.bool)
    lens, item, cat, dur = [], [], [], []
    for b in range(B):
        for c in range(C):
            order = [c] + [o for o in range(C) if o != c and mask[b, o]]
            order = order[:size]
            lens.append(len(order))
            pad = [0] * (size - len(order))
            item.append([int(cands.item_id[b, o]) for o in order] + pad)
            cat.append([int(cands.item_sparse["category"][b, o]) for o in order] + pad)
            dur.append([float(cands.item_dense["duration"][b, o]) for o in order] + pad)
    return {
        "request_len": torch.tensor(lens),
        "request_item_id": torch.tensor(item),
        "request_sparse": {"category": torch.tensor(cat)},
        "request_dense": {"duration": torch.tensor(dur)},
    }


def reference(module: RankingModule, request: Batch, cands: Candidates, branch_outputs: bool = False) -> dict:
    """Training-time forward on a Batch whose row b·C + c is request b with candidate c (gathered by index)."""
    B = cands.item_id.shape[0]
    rows = torch.arange(B).repeat_interleave(C)

    def user(t):
        return None if t is None else t[rows]

    batch = Batch(
        sample_index=rows,
        user_id=user(request.user_id),
        item_id=cands.item_id.reshape(-1),
        ts=user(request.ts),
        history_len=user(request.history_len),
        history_item_id=user(request.history_item_id),
        history_ts=user(request.history_ts),
        history_sparse={n: user(t) for n, t in request.history_sparse.items()},
        history_dense={n: user(t) for n, t in request.history_dense.items()},
        item_sparse={n: t.reshape(-1) for n, t in cands.item_sparse.items()},
        item_dense={n: t.reshape(-1) for n, t in cands.item_dense.items()},
        user_sparse={n: user(t) for n, t in request.user_sparse.items()},
        user_dense={n: user(t) for n, t in request.user_dense.items()},
        **(request_fields(cands, module.features.request_candidates) if module.features.request_candidates else {}),
    )
    with torch.no_grad():
        head_out = module(batch)[1]
    out = module.predictions(head_out)
    if branch_outputs:
        for name, branch_out in head_out.branches.items():
            out.update({f"{name}_{k}": v.float() for k, v in branch_out.outputs.items()})
    return {k: v.reshape(B, C, *v.shape[1:]) for k, v in out.items()}


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor of ``batch``."""
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value[start:stop]
        elif isinstance(value, dict):
            changes[f.name] = {k: t[start:stop] for k, t in value.items()}
    return dataclasses.replace(batch, **changes)


def candidate_rows(cands: Candidates, start: int, stop: int) -> Candidates:
    return Candidates(
        cands.item_id[start:stop],
        {n: t[start:stop] for n, t in cands.item_sparse.items()},
        {n: t[start:stop] for n, t in cands.item_dense.items()},
        None if cands.mask is None else cands.mask[start:stop],
    )


def assert_scores_match(scores: dict, expected: dict, mask: torch.Tensor, fill: float = 0.0) -> None:
    assert list(scores) == list(expected)
    for key, value in scores.items():
        assert value.shape == expected[key].shape, key
        torch.testing.assert_close(value[mask], expected[key][mask], atol=1e-5, rtol=1e-5, msg=key)
        masked = value[~mask]
        assert bool(torch.isnan(masked).all() if fill != fill else (masked == fill).all()), key


# ------------------------------------------------------------------------------------------ equality with training


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_scores_equal_training_forward(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    scorer = CandidateScorer(module)
    assert scorer.path == ENCODERS[encoder][1]
    scores = scorer.score(request, cands)
    assert set(scores) == {t.name for t in TASKS}
    assert_scores_match(scores, reference(module, request, cands), MASK)
    assert all(v.dtype == torch.float32 and v.shape == (len(LENGTHS), C) for v in scores.values())


def test_ple_heads() -> None:
    module = make_module("hstu_num_keys", heads=partial(PLE, num_levels=2, expert_dims=(16,), tower_dims=(8,)))
    request, cands = make_request(), make_candidates()
    assert_scores_match(CandidateScorer(module).score(request, cands), reference(module, request, cands), MASK)


@pytest.mark.parametrize("encoder", ["hstu_max_len", "longer_k4"])
def test_empty_history_width(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request([0, 0], width=0), make_candidates(2)
    assert_scores_match(CandidateScorer(module).score(request, cands), reference(module, request, cands), MASK[:2])


# ------------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("encoder", ["hstu_num_keys", "longer_k4", "ultra_hstu"])
def test_batch_equals_one_request_at_a_time(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    scorer = CandidateScorer(module)
    batched = scorer.score(request, cands)
    for b in range(len(LENGTHS)):
        single = scorer.score(rows(request, b, b + 1), candidate_rows(cands, b, b + 1))
        for key in batched:
            torch.testing.assert_close(single[key][0], batched[key][b], atol=1e-6, rtol=1e-6)
        # score_user: the same row through the one-user convenience, candidates unmasked
        user = scorer.score_user(
            request,
            cands.item_id[b],
            {"category": cands.item_sparse["category"][b]},
            {"duration": cands.item_dense["duration"][b]},
            row=b,
        )
        valid = cands.mask[b]
        for key in batched:
            assert user[key].shape == (C,)
            torch.testing.assert_close(user[key][valid], batched[key][b][valid], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encoder", ["hstu_max_len", "longer_k1", "mean_pool"])
def test_microbatch_sizes_agree(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    base = CandidateScorer(module).score(request, cands)
    for microbatch in (1, 3, C, C + 1, 100):
        scores = CandidateScorer(module, microbatch=microbatch).score(request, cands)
        for key in base:
            torch.testing.assert_close(scores[key], base[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("encoder", ["hstu_num_keys", "longer_k4", "ultra_hstu"])
def test_naive_equals_cached(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    cached = CandidateScorer(module, microbatch=4).score(request, cands)
    naive_scorer = CandidateScorer(module, microbatch=4, naive=True)
    assert naive_scorer.path == "reencode"
    naive = naive_scorer.score(request, cands)
    again = score_by_reencoding(module, request, cands, microbatch=5)
    for key in cached:
        torch.testing.assert_close(naive[key], cached[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again[key], naive[key], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------ candidates and masks


@pytest.mark.parametrize("encoder", ["hstu_num_keys", "longer_k4", "ultra_hstu"])
def test_candidate_item_features_are_used(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    scorer = CandidateScorer(module)
    base = scorer.score(request, cands)
    for group, name, new in [
        ("item_sparse", "category", lambda t: (t + 1) % 6),
        ("item_dense", "duration", lambda t: t + 40),
    ]:
        changed = {n: t.clone() for n, t in getattr(cands, group).items()}
        changed[name][2, 3] = new(changed[name][2, 3])
        scores = scorer.score(request, dataclasses.replace(cands, **{group: changed}))
        for key in base:
            differs = (scores[key] - base[key]).abs() > 1e-6
            if key == "click":  # a probability (watch_time's clamped expm1 may sit at 0 before and after)
                assert differs[2, 3], (group, key)
            differs[2, 3] = False
            assert not differs.any(), (group, key)


def test_masked_candidates_get_the_fill_value_whatever_they_hold() -> None:
    module = make_module("hstu_num_keys")
    request, cands = make_request(), make_candidates()
    garbage = dataclasses.replace(
        cands,
        item_id=cands.item_id.masked_fill(~MASK, 10**6),  # out of the vocabulary: replaced before the lookup
        item_sparse={"category": cands.item_sparse["category"].masked_fill(~MASK, -3)},
        item_dense={"duration": cands.item_dense["duration"].masked_fill(~MASK, float("nan"))},
    )
    expected = CandidateScorer(module).score(request, cands)
    scores = CandidateScorer(module, fill_value=float("nan")).score(request, garbage)
    for key in expected:
        assert torch.isnan(scores[key][~MASK]).all()
        torch.testing.assert_close(scores[key][MASK], expected[key][MASK])
        assert (expected[key][~MASK] == 0).all()
    # no mask: every candidate valid
    full = CandidateScorer(module).score(request, dataclasses.replace(cands, mask=None))
    for key in expected:
        torch.testing.assert_close(full[key][MASK], expected[key][MASK])
    # no candidates at all, no requests at all
    no_columns = Candidates(
        cands.item_id[:, :0],
        {"category": cands.item_sparse["category"][:, :0]},
        {"duration": cands.item_dense["duration"][:, :0]},
    )
    empty = CandidateScorer(module).score(request, no_columns)
    assert {k: tuple(v.shape) for k, v in empty.items()} == {t.name: (5, 0) for t in TASKS}
    empty = CandidateScorer(module).score(rows(request, 0, 0), candidate_rows(cands, 0, 0))
    assert {k: tuple(v.shape) for k, v in empty.items()} == {t.name: (0, C) for t in TASKS}


# ------------------------------------------------------------------------------------------ branches


@pytest.mark.parametrize("encoder", ["hstu_max_len", "longer_k4", "ultra_hstu"])
def test_fatigue_branch(encoder: str) -> None:
    fatigue = partial(
        FRec, recent=4, interest_window=8, num_interests=2, item_dim=8, category_dim=4, conv_channels=(4, 8),
        kernel_size=3, hidden_dim=16,
    )  # fmt: skip
    module = make_module(encoder, fatigue=fatigue)
    request, cands = make_request(), make_candidates()
    scores = CandidateScorer(module, microbatch=5, branch_outputs=True).score(request, cands)
    expected = reference(module, request, cands, branch_outputs=True)
    assert "fatigue_score" in scores
    assert_scores_match(scores, expected, MASK)
    # the branch is on the scores' path: without it they differ
    off = make_module(encoder)
    off.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("fatigue.")})
    plain = CandidateScorer(off).score(request, cands)
    assert not torch.allclose(plain["click"][MASK], scores["click"][MASK])


@pytest.mark.parametrize("encoder", ["hstu_num_keys", "longer_k1", "mean_pool"])
def test_uplift_branch_gets_the_request_candidate_set(encoder: str) -> None:
    features = dataclasses.replace(FEATURES, num_treatments=2, request_candidates=3)
    module = make_module(encoder, features=features, uplift=partial(CDUM, task="click", dim=8, hidden_dims=(16,)))
    request, cands = make_request(features=features), make_candidates()
    scores = CandidateScorer(module, microbatch=4, branch_outputs=True).score(request, cands)
    expected = reference(module, request, cands, branch_outputs=True)
    assert {"uplift_response_t0", "uplift_response_t1", "uplift_effect_t1"} <= set(scores)
    assert_scores_match(scores, expected, MASK)
    # without branch outputs: the task scores only, the same values
    tasks_only = CandidateScorer(module).score(request, cands)
    assert set(tasks_only) == {t.name for t in TASKS}
    for key in tasks_only:
        torch.testing.assert_close(tasks_only[key], scores[key])


def test_pair_batch_request_candidates() -> None:
    cands = make_candidates()
    cands = dataclasses.replace(cands, mask=MASK)
    request = make_request()
    for c0, c1 in [(0, C), (2, 5)]:
        pairs = pair_batch(request, cands, c0, c1, request_candidates=3)
        expected = request_fields(cands, 3)
        keep = torch.zeros(len(LENGTHS), C, dtype=torch.bool)
        keep[:, c0:c1] = True
        keep = keep.reshape(-1)
        assert torch.equal(pairs.request_len, expected["request_len"][keep])
        assert torch.equal(pairs.request_item_id, expected["request_item_id"][keep])
        assert torch.equal(pairs.request_dense["duration"], expected["request_dense"]["duration"][keep])
        assert torch.equal(pairs.history_item_id, request.history_item_id.repeat_interleave(c1 - c0, dim=0))
    # one request: the per-user tensors are views of the request's (no copy)
    pairs = pair_batch(rows(request, 0, 1), candidate_rows(cands, 0, 1), 0, C)
    assert pairs.history_item_id.data_ptr() == request.history_item_id.data_ptr()
    assert pairs.history_item_id.stride(0) == 0


# ------------------------------------------------------------------------------------------ API


def test_scorer_state_and_outputs() -> None:
    module = make_module("hstu_num_keys").train()
    scorer = CandidateScorer(module)
    assert not module.training  # eval mode: dropout off
    module.train()
    scores = scorer.score(make_request(), make_candidates())
    assert not module.training and not any(v.requires_grad for v in scores.values())


@pytest.mark.parametrize("encoder", ["hstu_num_keys", "longer_k4"])
def test_bf16_autocast_runs_close_to_float32(encoder: str) -> None:
    module = make_module(encoder)
    request, cands = make_request(), make_candidates()
    scorer = CandidateScorer(module, microbatch=4)
    full = scorer.score(request, cands)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = scorer.score(request, cands)
    for key in full:
        assert torch.isfinite(half[key]).all()
        torch.testing.assert_close(half[key], full[key], atol=0.1, rtol=0.1)


def test_path_choice() -> None:
    class CustomHSTU(HSTUEncoder):
        def forward(self, batch):  # a subclass with its own forward: its cache split is unknown
            return super().forward(batch)

    assert scoring_path(make_module("hstu_num_keys").encoder) == "hstu_prefix"
    assert scoring_path(make_module("longer_k1").encoder) == "longer_cache"
    assert scoring_path(make_module("ultra_hstu").encoder) == "reencode"
    assert scoring_path(CustomHSTU(FEATURES, **SMALL)) == "reencode"

    class CustomModule(RankingModule):
        def forward(self, batch):
            return super().forward(batch)

    torch.manual_seed(0)
    custom = CustomModule(TASKS, FEATURES, encoder=ENCODERS["hstu_num_keys"][0], heads=MMOE)
    assert CandidateScorer(custom).path == "reencode"


def test_bad_inputs_raise() -> None:
    module = make_module("hstu_num_keys")
    scorer = CandidateScorer(module)
    request, cands = make_request(), make_candidates()
    with pytest.raises(ValueError, match=r"candidates\.item_id has 4 rows but the request has 5"):
        scorer.score(request, make_candidates(4))
    with pytest.raises(ValueError, match=r"candidates.item_id must be \(B, C\)"):
        scorer.score(request, dataclasses.replace(cands, item_id=cands.item_id.reshape(-1)))
    with pytest.raises(ValueError, match=r"candidates\.item_id must be an integer"):
        scorer.score(request, dataclasses.replace(cands, item_id=cands.item_id.float()))
    with pytest.raises(ValueError, match=r"candidates.item_sparse: unknown item feature\(s\) \['genre'\]"):
        scorer.score(request, dataclasses.replace(cands, item_sparse={**cands.item_sparse, "genre": cands.item_id}))
    with pytest.raises(ValueError, match=r"candidates.item_dense: missing item feature\(s\) \['duration'\]"):
        scorer.score(request, dataclasses.replace(cands, item_dense={}))
    with pytest.raises(ValueError, match=r"candidates.item_dense\['duration'\] must have shape"):
        scorer.score(request, dataclasses.replace(cands, item_dense={"duration": cands.item_dense["duration"][:, :3]}))
    with pytest.raises(ValueError, match=r"candidates\.mask must be a bool tensor"):
        scorer.score(request, dataclasses.replace(cands, mask=MASK.long()))
    with pytest.raises(ValueError, match=r"request\.ts must be"):
        scorer.score(dataclasses.replace(request, ts=request.ts[:2]), cands)
    with pytest.raises(ValueError, match="microbatch must be an int >= 1"):
        CandidateScorer(module, microbatch=0)
    with pytest.raises(ValueError, match="score_user scores one user"):
        scorer.score_user(request, cands.item_id[0])
    with pytest.raises(ValueError, match="row=9 is out of range"):
        scorer.score_user(request, cands.item_id[0], row=9)
    with pytest.raises(ValueError, match=r"item_id must be \(C,\)"):
        scorer.score_user(request, cands.item_id, row=0)


# ------------------------------------------------------------------------------------------ HSTU prefix cache


@pytest.mark.parametrize("attention_norm", ["num_keys", "max_len"])
def test_hstu_prefix_cache_matches_forward(attention_norm: str) -> None:
    torch.manual_seed(0)
    encoder = HSTUEncoder(FEATURES, **SMALL, attention_norm=attention_norm, num_position_buckets=4).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        batch = make_request()
        out = encoder(batch)
        cache = encoder.encode_user_prefix(batch)
        cand = encoder.forward_candidates(batch, cache)  # one candidate per user: the batch's own
    torch.testing.assert_close(cand.target, out.target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cand.user, out.user, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.sequence, out.sequence, atol=1e-5, rtol=1e-5)
    assert cand.sequence is None and cand.mask is None
    assert len(cache.keys) == 2 and cache.keys[0].shape == (5, 2, 8, 8) and cache.bias[0].shape == (5, 2, 1, 9)
    expected_n = [float(FEATURES.max_len + 1)] * 5 if attention_norm == "max_len" else [n + 1.0 for n in LENGTHS]
    assert cache.n.tolist() == expected_n
    # the cache does not read the candidate
    other = dataclasses.replace(batch, item_id=(batch.item_id + 3) % FEATURES.num_items)
    with torch.no_grad():
        cache2 = encoder.encode_user_prefix(other)
    for a, b in zip(cache.keys + cache.values, cache2.keys + cache2.values, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a multiple"):
        encoder.forward_candidates(dataclasses.replace(batch, item_id=batch.item_id[:3]), cache)


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("merge_k", [1, 4])
def test_longer_candidate_query_path_equals_forward(num_layers: int, merge_k: int) -> None:
    """`LongerEncoder.encode_user_context` + `forward_candidates` (only the candidate's query per layer) give
    `forward`'s target and user states, with a cache that never reads the candidate."""
    torch.manual_seed(0)
    encoder = LongerEncoder(
        FEATURES, dim=16, num_layers=num_layers, num_heads=2, num_learned_global_tokens=1, merge_k=merge_k,
        num_recent_queries=3,
    ).eval()  # fmt: skip
    for p in encoder.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    batch = random_batch(FEATURES, [0, 1, 5, FEATURES.max_len], FEATURES.max_len, 0)
    with torch.no_grad():
        want = encoder(batch)
        cache = encoder.encode_user_context(batch)
        got = encoder.forward_candidates(batch, cache)
        other = dataclasses.replace(batch, item_id=(batch.item_id + 1) % FEATURES.num_items)
        assert torch.equal(encoder.encode_user_context(other).keys1, cache.keys1)
    torch.testing.assert_close(got.target, want.target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.user, want.user, atol=1e-5, rtol=1e-5)
