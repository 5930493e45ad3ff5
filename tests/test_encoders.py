"""HSTU encoder: shapes, no leakage (padding, causality, candidate-free history), kernels, checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import FEATURES, widen

from encoders import FeatureEmbeddings, HSTUEncoder, bucket_position_distance, hstu_attention
from mtrank.batch import Batch
from mtrank.data.synth import random_batch


def make_batch(history_len: list[int], L: int = 6, seed: int = 0, id_dtype: torch.dtype = torch.int64) -> Batch:
    """A random `Batch` for ``FEATURES``, left-aligned histories, 0 at padding, times before ``ts``."""
    batch = random_batch(FEATURES, history_len, L, seed)
    if id_dtype == torch.int64:
        return batch

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(id_dtype)

    return dataclasses.replace(
        batch,
        user_id=cast(batch.user_id),
        item_id=cast(batch.item_id),
        history_item_id=cast(batch.history_item_id),
        history_sparse={n: cast(t) for n, t in batch.history_sparse.items()},
        item_sparse={n: cast(t) for n, t in batch.item_sparse.items()},
        user_sparse={n: cast(t) for n, t in batch.user_sparse.items()},
    )


def make_encoder(**kwargs) -> HSTUEncoder:
    torch.manual_seed(0)
    return HSTUEncoder(FEATURES, dim=16, num_layers=2, num_heads=2, output_dim=12, **kwargs).eval()


def replace_history(batch: Batch, b: int, i: int) -> Batch:
    """A copy of ``batch`` whose behaviour ``i`` of row ``b`` is different (item, side channels, time)."""
    item = batch.history_item_id.clone()
    item[b, i] = (item[b, i] + 7) % FEATURES.num_items
    sparse = {n: t.clone() for n, t in batch.history_sparse.items()}
    for n, t in sparse.items():
        t[b, i] = (t[b, i] + 1) % FEATURES.history_sparse[n]
    dense = {n: t.clone() for n, t in batch.history_dense.items()}
    dense["watch"][b, i] += 33.0
    hts = batch.history_ts.clone()
    hts[b, i] -= 5
    return dataclasses.replace(batch, history_item_id=item, history_sparse=sparse, history_dense=dense, history_ts=hts)


def test_output_shapes_and_zero_padding() -> None:
    batch = make_batch([6, 3, 1, 0])
    out = make_encoder()(batch)
    assert out.target.shape == (4, 12)
    assert out.user.shape == (4, 16)
    assert out.sequence.shape == (4, 6, 16)
    assert torch.equal(out.mask, batch.history_mask())
    assert torch.all(out.sequence[~out.mask] == 0)
    assert torch.all(out.user[3] == 0)  # empty history
    assert torch.allclose(out.user[1], out.sequence[1, 2])  # newest valid position
    assert torch.isfinite(out.target).all()


def test_padding_changes_nothing() -> None:
    batch = make_batch([6, 3, 1, 0])
    encoder = make_encoder()
    out = encoder(batch)
    changed = batch
    for b, i in [(1, 3), (1, 5), (2, 1), (3, 0)]:
        changed = replace_history(changed, b, i)
    out2 = encoder(changed)
    assert torch.equal(out.target, out2.target)
    assert torch.equal(out.sequence, out2.sequence)
    assert torch.equal(out.user, out2.user)


def test_output_does_not_depend_on_padding_width() -> None:
    narrow = make_batch([3, 2, 0], L=3)
    pad = 4
    wide = widen(narrow, pad)
    for norm in ("num_keys", "max_len"):
        encoder = make_encoder(attention_norm=norm)
        out, out_wide = encoder(narrow), encoder(wide)
        assert torch.allclose(out.target, out_wide.target, atol=1e-6)
        assert torch.allclose(out.sequence, out_wide.sequence[:, :3], atol=1e-6)


def test_causal_newest_behaviour_changes_target_not_earlier_states() -> None:
    batch = make_batch([6, 4])
    encoder = make_encoder()
    out = encoder(batch)
    out2 = encoder(replace_history(batch, 1, 3))  # newest behaviour of row 1
    assert not torch.allclose(out.target[1], out2.target[1])
    assert torch.allclose(out.sequence[1, :3], out2.sequence[1, :3])  # earlier positions: causal
    assert not torch.allclose(out.sequence[1, 3], out2.sequence[1, 3])
    assert torch.equal(out.target[0], out2.target[0])  # other rows untouched


def test_history_states_do_not_depend_on_candidate() -> None:
    batch = make_batch([6, 3, 0])
    encoder = make_encoder()
    out = encoder(batch)
    other = dataclasses.replace(
        batch,
        item_id=(batch.item_id + 11) % FEATURES.num_items,
        item_sparse={"category": (batch.item_sparse["category"] + 1) % 6},
        item_dense={"duration": batch.item_dense["duration"] + 10},
    )
    out2 = encoder(other)
    assert torch.equal(out.sequence, out2.sequence)
    assert torch.equal(out.user, out2.user)
    assert not torch.allclose(out.target, out2.target)


def test_empty_histories_and_int32_ids() -> None:
    batch = make_batch([0, 0], L=0, id_dtype=torch.int32)
    out = make_encoder(attention_norm="max_len")(batch)
    assert out.target.shape == (2, 12) and out.sequence.shape == (2, 0, 16)
    assert torch.isfinite(out.target).all()
    out = make_encoder()(make_batch([5, 0, 2], id_dtype=torch.int32))
    assert torch.isfinite(out.target).all()


def test_gradients_reach_embeddings() -> None:
    encoder = make_encoder().train()
    out = encoder(make_batch([6, 3, 0]))
    (out.target.square().sum() + out.sequence.sum()).backward()
    assert_gradients(
        [
            *embedding_parameters(encoder.embeddings),
            ("rab time", encoder.layers[0].rab.time.weight),
            ("rab position", encoder.layers[0].rab.position.weight),
        ]
    )


def embedding_parameters(emb: FeatureEmbeddings) -> list[tuple[str, torch.Tensor]]:
    """(name, table) of every `FeatureEmbeddings` table that ``FEATURES`` uses."""
    return [
        ("item", emb.item.weight),
        ("action", emb.history_sparse["action"].weight),
        ("category", emb.history_sparse["category"].weight),
        ("watch", emb.history_dense.weight),
        ("duration", emb.item_dense.weight),
        ("user", emb.user.weight),
        ("age", emb.user_sparse["age"].weight),
    ]


def assert_gradients(named: list[tuple[str, torch.Tensor]]) -> None:
    """Every parameter got a non-zero gradient."""
    for name, param in named:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_candidate_shares_item_and_category_tables() -> None:
    emb = FeatureEmbeddings(FEATURES, dim=8)
    assert emb.shared_item_sparse == ["category"]
    assert len(emb.item_sparse) == 0
    batch = make_batch([2], L=2)
    batch = dataclasses.replace(batch, item_dense={"duration": torch.zeros(1)})
    batch.item_sparse["category"] = batch.history_sparse["category"][:, 0]
    batch.item_id = batch.history_item_id[:, 0]
    expected = emb.item.weight[batch.item_id] + emb.history_sparse["category"].weight[batch.item_sparse["category"]]
    assert torch.allclose(emb.candidate_tokens(batch), expected)


def naive_hstu_attention(q, k, v, bias, mask, alpha, n):
    B, H, N, _ = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = [j for j in range(N) if mask[b, i, j]]
                denom = max(len(keys), 1) if n is None else n
                for j in keys:
                    score = alpha * float(q[b, h, i] @ k[b, h, j]) + float(bias[b, h, i, j])
                    out[b, h, i] += F.silu(torch.tensor(score, dtype=torch.float64)) / denom * v[b, h, j].double()
    return out


@pytest.mark.parametrize("n", [None, 7.0])
def test_hstu_attention_matches_naive_loop(n: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    B, H, N, dqk, dv = 2, 2, 5, 3, 4
    q, k = torch.randn(B, H, N, dqk, generator=g), torch.randn(B, H, N, dqk, generator=g)
    v, bias = torch.randn(B, H, N, dv, generator=g), torch.randn(B, H, N, N, generator=g)
    mask = torch.rand(B, N, N, generator=g) > 0.4
    mask[0, 2] = False  # a query with no key
    got = hstu_attention(q, k, v, bias, mask, alpha=0.5, n=n)
    assert torch.allclose(got.double(), naive_hstu_attention(q, k, v, bias, mask, 0.5, n), atol=1e-5)
    assert torch.all(got[0, :, 2] == 0)


def test_position_buckets_are_monotone_and_bounded() -> None:
    d = torch.arange(0, 1000)
    buckets = bucket_position_distance(d, num_buckets=32, max_distance=256)
    assert torch.equal(buckets[:16], d[:16]) and buckets.max() == 31
    assert torch.all(buckets[1:] >= buckets[:-1])
    assert torch.equal(bucket_position_distance(d[:9], 32, 8), d[:9])


def test_unknown_kernel_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown HSTU attention kernel .cuda.*reference"):
        HSTUEncoder(FEATURES, kernel="cuda")


def test_activation_checkpointing_same_outputs_and_grads() -> None:
    batch = make_batch([6, 3, 0])
    results = []
    for ckpt in (False, True):
        encoder = make_encoder(activation_checkpointing=ckpt).train()
        out = encoder(batch)
        out.target.square().sum().backward()
        results.append((out.target.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}))
    (t0, g0), (t1, g1) = results
    assert torch.allclose(t0, t1)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name


def test_bf16_autocast_on_cpu() -> None:
    encoder = make_encoder()
    batch = make_batch([6, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(batch)
    assert torch.isfinite(out.target.float()).all()
    assert torch.allclose(out.target.float(), encoder(batch).target, atol=0.1)


def test_relative_attention_bias_matches_embedding_lookup_forward_and_backward() -> None:
    from encoders.hstu import RelativeAttentionBias

    torch.manual_seed(0)
    rab = RelativeAttentionBias(num_heads=3, num_position_buckets=5, num_time_buckets=7)
    position = torch.randint(0, 5, (2, 4, 4))
    time = torch.randint(0, 7, (2, 4, 4))
    upstream = torch.randn(2, 3, 4, 4)
    (rab(position, time) * upstream).sum().backward()
    got = (rab.position.weight.grad.clone(), rab.time.weight.grad.clone())
    rab.zero_grad()
    expected = (rab.position(position) + rab.time(time)).permute(0, 3, 1, 2)  # (B, H, N, N)
    torch.testing.assert_close(rab(position, time), expected)
    (expected * upstream).sum().backward()
    torch.testing.assert_close(got[0], rab.position.weight.grad)
    torch.testing.assert_close(got[1], rab.time.weight.grad)
