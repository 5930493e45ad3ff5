"""ULTRA-HSTU: SLA against the dense rule, K1 >= N is HSTU, padding/causality invariances, truncation,
mixture of transducers, interleaved tokens, recomputation modes, settings validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FEATURES
from test_encoders import make_batch, replace_history

from encoders import HSTUEncoder, TransducerStream, UltraHSTUEncoder, hstu_attention, sla_attention, sla_mask
from encoders.hstu import AttentionInputs, HSTULayer, bucket_position_distance, bucket_time_delta
from encoders.ultra_hstu import UltraHSTULayer, build_sla_layout
from mtrank.batch import Batch


def make_ultra(**kwargs) -> UltraHSTUEncoder:
    torch.manual_seed(0)
    settings = {"dim": 16, "num_layers": 2, "num_heads": 2, "output_dim": 12, **kwargs}
    return UltraHSTUEncoder(FEATURES, **settings).eval()


def pad_batch(batch: Batch, L: int) -> Batch:
    """``batch`` with its history tensors zero-padded on the right to width ``L``."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, L - t.shape[1]))

    return dataclasses.replace(
        batch,
        history_item_id=pad(batch.history_item_id),
        history_ts=pad(batch.history_ts),
        history_sparse={n: pad(t) for n, t in batch.history_sparse.items()},
        history_dense={n: pad(t) for n, t in batch.history_dense.items()},
    )


CONFIGS = {
    "full": {},
    "sla": {"local_window": 2, "global_prefix": 2},
    "sla_truncated": {"local_window": 3, "full_layers": 1, "tail_len": 3},
    "interleaved": {"merge_action_item": False, "local_window": 3, "num_context_tokens": 2},
    "mot": {
        "local_window": 2,
        "streams": [TransducerStream(), TransducerStream("engaged", "action", [1, 2], max_len=4)],
        "fusion": "concat",
    },
    "no_prefix": {"num_context_tokens": 0, "local_window": 2},
}


# ------------------------------------------------------------------------------------------ SLA


def dense_reference(x, c, valid, position, ts, cand_pos, cand_ts, layer, k1, k2):
    """The same layer computed densely: HSTULayer over [sequence, candidate] with the literal SLA mask."""
    B, W, _ = x.shape
    seq = sla_mask(position, valid, k1, k2)  # (B, W, W)
    mask = torch.zeros(B, W + 1, W + 1, dtype=torch.bool)
    mask[:, :W, :W] = seq
    mask[:, W, :W] = valid
    mask[:, W, W] = True
    pos = torch.cat([position, cand_pos[:, None]], dim=1)
    t = torch.cat([ts, cand_ts[:, None]], dim=1)
    pb = bucket_position_distance((pos[:, :, None] - pos[:, None, :]).clamp(min=0), 8, 40)
    tb = bucket_time_delta(t[:, :, None] - t[:, None, :], 16)
    full_valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    inputs = AttentionInputs("reference", None, mask=mask, position_bucket=pb, time_bucket=tb)
    out = HSTULayer.forward(layer, torch.cat([x, c], dim=1), full_valid, inputs)
    return out[:, :W], out[:, W:]


@pytest.mark.parametrize(
    ("k1", "k2", "W", "block"),
    [(1, 0, 7, 64), (2, 3, 9, 1), (3, 1, 10, 2), (4, 4, 5, 64), (5, 2, 13, 3), (50, 0, 9, 4), (6, 2, 20, 64)],
)
def test_sla_layer_matches_the_dense_rule(k1: int, k2: int, W: int, block: int) -> None:
    torch.manual_seed(k1 * 10 + k2)
    B, D = 3, 8
    lengths = torch.tensor([W, W - 2, 1])
    valid = torch.arange(W)[None, :] < lengths[:, None]
    position = torch.arange(W).expand(B, W) * valid
    ts = (1000 + torch.randint(0, 10_000, (B, W)).cumsum(1)) * valid
    cand_pos, cand_ts = lengths, torch.full((B,), 10**6)
    layer = UltraHSTULayer(D, 2, 4, 4, num_position_buckets=8, num_time_buckets=16).double()
    x = torch.randn(B, W, D, dtype=torch.double) * valid[..., None]
    c = torch.randn(B, 1, D, dtype=torch.double)
    layout = build_sla_layout(position, valid, ts, cand_pos, cand_ts, k1, k2, 8, 16, 40, None, block)
    got_x, got_c = layer(x, c, valid, layout)
    want_x, want_c = dense_reference(x, c, valid, position, ts, cand_pos, cand_ts, layer, k1, k2)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_c, want_c)


def test_k1_at_least_n_is_full_causal_hstu_attention() -> None:
    torch.manual_seed(0)
    B, H, W, d = 2, 2, 11, 4
    valid = torch.arange(W)[None, :] < torch.tensor([[W], [6]])
    position = torch.arange(W).expand(B, W) * valid
    causal = sla_mask(position, valid, W, 0)
    torch.testing.assert_close(causal, valid[:, :, None] & valid[:, None, :] & torch.ones(W, W).tril().bool())
    q, k, v = (torch.randn(B, H, W + 1, d, dtype=torch.double) for _ in range(3))
    ts = torch.zeros(B, W, dtype=torch.long)
    for k1 in (W, W + 5, 10**6):
        layout = build_sla_layout(position, valid, ts, valid.sum(1), ts[:, 0], k1, 0, 0, 0, W, None)
        out, _ = sla_attention(
            q[:, :, :W], k[:, :, :W], v[:, :, :W], q[:, :, W:], k[:, :, W:], v[:, :, W:], layout, None, None, None
        )
        want = hstu_attention(q[:, :, :W], k[:, :, :W], v[:, :, :W], None, causal)
        torch.testing.assert_close(out, want)


def test_ultra_hstu_with_every_part_off_is_the_hstu_encoder() -> None:
    """P = 0, K1 >= N, merged tokens, one stream, no truncation: the same function as `HSTUEncoder`."""
    batch = make_batch([6, 3, 1, 0], L=FEATURES.max_len)
    torch.manual_seed(0)
    hstu = HSTUEncoder(FEATURES, dim=16, num_layers=2, num_heads=2, output_dim=12).eval()
    ultra = make_ultra(num_context_tokens=0, local_window=FEATURES.max_len)
    state = {k.replace("layers.", "transducers.0."): v for k, v in hstu.state_dict().items()}
    ultra.load_state_dict(state)
    want, got = hstu(batch), ultra(batch)
    torch.testing.assert_close(got.target, want.target)
    torch.testing.assert_close(got.user, want.user)
    torch.testing.assert_close(got.sequence, want.sequence)


def test_sla_costs_scale_with_the_window_not_the_sequence() -> None:
    W, k1, k2, block = 512, 16, 4, 8
    valid = torch.ones(1, W, dtype=torch.bool)
    position = torch.arange(W)[None]
    layout = build_sla_layout(
        position, valid, position, torch.tensor([W]), torch.tensor([W]), k1, k2, 0, 0, W, None, block
    )
    nb, Wk = layout.key_index.shape
    assert layout.block == block and Wk == block + k1 - 1
    assert layout.block * nb * Wk == W * (k1 + block - 1)
    assert layout.global_mask.shape == (1, W, k2)
    # every query sees its window and the prefix, and nothing else
    keys = layout.n_sequence.view(W)
    assert keys[100].item() == k1 + k2
    assert keys[3].item() == 4


# ------------------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padding_never_changes_outputs(name: str) -> None:
    encoder = make_ultra(**CONFIGS[name])
    batch = make_batch([5, 3, 1, 0], L=5)
    base = encoder(batch)
    for L in (6, FEATURES.max_len):
        out = encoder(pad_batch(batch, L))
        torch.testing.assert_close(out.target, base.target)
        torch.testing.assert_close(out.user, base.user)
        if base.sequence is not None:
            torch.testing.assert_close(out.sequence[:, :5], base.sequence)
            assert out.sequence[:, 5:].abs().max() == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_token_attends_to_a_later_behaviour(name: str) -> None:
    encoder = make_ultra(**CONFIGS[name])
    batch = make_batch([8, 7], L=8)
    e_c = encoder.embeddings.candidate_tokens(batch)
    context = encoder.context(encoder.embeddings.user_features(batch)).view(2, -1, 16) if encoder.context else None
    changed_event = 5
    changed = replace_history(batch, 0, changed_event)
    changed.history_sparse["action"][0] = batch.history_sparse["action"][0]  # keep stream membership
    for s in range(len(encoder.streams)):
        _, x, seq = encoder.run_stream(batch, s, e_c, context)
        _, x2, seq2 = encoder.run_stream(changed, s, e_c, context)
        assert torch.equal(seq.position, seq2.position)
        # tokens of earlier events (times ascend) and the prefix do not move
        earlier = (seq.position[0] < encoder.num_context_tokens) | (seq.ts[0] < batch.history_ts[0, changed_event])
        before = seq.valid[0] & earlier
        assert before.any()
        torch.testing.assert_close(x2[0, before], x[0, before])
        torch.testing.assert_close(x2[1], x[1])  # other rows untouched


def test_history_states_and_user_are_candidate_free() -> None:
    encoder = make_ultra(**CONFIGS["sla"])
    batch = make_batch([6, 3], L=6)
    other = dataclasses.replace(batch, item_id=(batch.item_id + 3) % FEATURES.num_items)
    a, b = encoder(batch), encoder(other)
    torch.testing.assert_close(a.user, b.user)
    torch.testing.assert_close(a.sequence, b.sequence)
    assert not torch.allclose(a.target, b.target)


def test_candidate_sees_the_whole_history_through_sla() -> None:
    encoder = make_ultra(local_window=1, global_prefix=1)
    batch = make_batch([8], L=8)
    base = encoder(batch).target
    for i in range(8):  # even the oldest behaviour, outside every sequence token's window, reaches the target
        assert not torch.allclose(encoder(replace_history(batch, 0, i)).target, base)


def test_truncated_layers_see_only_the_tail() -> None:
    encoder = make_ultra(num_layers=1, full_layers=0, tail_len=3)
    batch = make_batch([8, 2], L=8)
    base = encoder(batch).target
    for i in range(5):  # older than the newest 3: never seen
        torch.testing.assert_close(encoder(replace_history(batch, 0, i)).target, base)
    for i in range(5, 8):
        assert not torch.allclose(encoder(replace_history(batch, 0, i)).target[0], base[0])
    # a short row keeps all its behaviours
    assert not torch.allclose(encoder(replace_history(batch, 1, 0)).target[1], base[1])


def test_a_stream_reads_only_its_behaviours() -> None:
    stream = TransducerStream("engaged", "action", [1, 2])
    encoder = make_ultra(streams=[stream], local_window=2)
    batch = make_batch([8], L=8)
    action = batch.history_sparse["action"][0]
    base = encoder(batch).target
    for i in range(8):
        changed = replace_history(batch, 0, i)
        changed.history_sparse["action"][0, i] = action[i]  # keep its stream membership
        same = torch.allclose(encoder(changed).target, base)
        assert same == (action[i].item() not in (1, 2)), i


def test_stream_keeps_its_newest_behaviours_in_order() -> None:
    stream = TransducerStream("engaged", "action", [1, 2], max_len=2)
    encoder = make_ultra(streams=[stream], num_context_tokens=1)
    batch = make_batch([8, 0], L=8)
    seq = encoder.stream_sequence(batch, 0, torch.zeros(2, 1, 16))
    action = batch.history_sparse["action"][0]
    kept = [i for i in range(8) if action[i].item() in (1, 2)][-2:]
    assert seq.length.tolist() == [1 + len(kept), 1]
    want_ts = batch.history_ts[0, kept]
    torch.testing.assert_close(seq.ts[0, 1 : 1 + len(kept)], want_ts)


def test_interleaved_tokens_double_the_sequence() -> None:
    merged, interleaved = make_ultra(), make_ultra(merge_action_item=False)
    batch = make_batch([5, 2], L=6)
    context = torch.zeros(2, 1, 16)
    a, b = merged.stream_sequence(batch, 0, context), interleaved.stream_sequence(batch, 0, context)
    assert a.length.tolist() == [6, 3]
    assert b.length.tolist() == [11, 5]
    # item and action parts sum to the merged token
    item, action = interleaved._item_and_action_parts(batch)
    mask = batch.history_mask().unsqueeze(-1)
    torch.testing.assert_close((item + action) * mask, interleaved.embeddings.history_tokens(batch))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_gives_the_same_gradients(mode: str) -> None:
    batch = make_batch([6, 3, 0], L=6)
    grads = []
    for recompute in ("none", mode):
        encoder = make_ultra(recompute=recompute, **CONFIGS["sla_truncated"]).train()
        encoder.dropout.p = 0.0
        for layer in encoder.transducers[0]:
            layer.dropout.p = 0.0
        encoder.target_mlp[2].p = 0.0
        encoder(batch).target.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_fusions_and_shapes() -> None:
    batch = make_batch([6, 3, 1, 0], L=8)
    for fusion in ("sum", "concat"):
        out = make_ultra(streams=[TransducerStream(), TransducerStream("clicks", "action", [1])], fusion=fusion)(batch)
        assert out.target.shape == (4, 12) and out.user.shape == (4, 16)
        assert torch.isfinite(out.target).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_prefix": 0, "num_context_tokens": 2}, "global_prefix=0 is below num_context_tokens=2"),
        ({"full_layers": 1}, "set both full_layers and tail_len"),
        ({"full_layers": 3, "tail_len": 4}, "0 <= full_layers <= num_layers"),
        ({"local_window": 0}, "local_window must be >= 1"),
        ({"streams": [TransducerStream("x", "colour", [1])]}, "channel 'colour' is not an integer history channel"),
        ({"streams": [TransducerStream("x", "action", [9])]}, r"values \[9\] are outside the vocabulary \[0, 3\)"),
        ({"streams": [TransducerStream("x", "action")]}, "needs a non-empty 'values' list"),
        ({"action_channels": ["nope"]}, "action_channels names 'nope'"),
        ({"fusion": "mean"}, "fusion must be"),
        ({"recompute": "some"}, "recompute must be"),
        ({"kernel": "cuda"}, "unknown ULTRA-HSTU attention kernel"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_ultra(**kwargs)


def test_history_wider_than_max_len_is_refused() -> None:
    batch = make_batch([3], L=FEATURES.max_len + 1)
    with pytest.raises(ValueError, match=r"exceeds features\.max_len"):
        make_ultra()(batch)
