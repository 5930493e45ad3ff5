"""LONGER attention kernels ("reference", "sdpa", "flex", "auto"): every kernel against "reference" on the
attention function (outputs and q/k/v gradients) and on the whole encoder (outputs and parameter gradients),
float32 and bfloat16, odd lengths, empty and length-1 histories, lengths across FlexAttention's 128 blocks.

Tolerances: float32 ``atol = rtol = 1e-5`` on CPU (``2e-5`` / ``1e-4`` on CUDA); bfloat16 inputs
``atol = rtol = 2e-2`` on the attention function (one bf16 rounding of outputs of size ~1, the reference
computing in float32), ``5e-2`` on the encoder under autocast (bf16 roundings through every layer).
Queries without any allowed key get 0 (checked on CPU for every kernel, on CUDA for "flex").
FlexAttention has no backward pass on CPU: there it is checked forward only (eager, unfused); its gradients
are checked by the ``gpu`` tests (compiled), skipped without CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import FEATURES

import encoders.longer as longer
from encoders.longer import (
    FLEX_BLOCK_SIZE,
    LONGER_ATTENTION_KERNELS,
    LongerBlock,
    LongerEncoder,
    LongerMask,
    longer_attention,
    longer_attention_kernel,
)
from mtrank.data.synth import random_batch

FP32 = {"atol": 1e-5, "rtol": 1e-5}
FP32_CUDA = {"atol": 2e-5, "rtol": 1e-4}
BF16 = {"atol": 2e-2, "rtol": 2e-2}
BF16_ENCODER = {"atol": 5e-2, "rtol": 5e-2}
WIDE = dataclasses.replace(FEATURES, max_len=160)  # histories long enough for 127, 128, 129 merged tokens
HAS_FLEX = longer.flex_attention is not None
needs_flex = pytest.mark.skipif(not HAS_FLEX, reason="torch without FlexAttention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (B, H, Q, N, d): single token, odd lengths, LONGER's cross-attention shape, around FlexAttention's 128 blocks
SHAPES = [(2, 2, 1, 1, 8), (3, 2, 5, 7, 8), (2, 2, 35, 129, 16), (2, 1, 127, 127, 8), (1, 2, 128, 129, 8)]
# (samples, groups, group size K) of the InnerTransformer: G·K = 6, 126, 128, 129 and 260 (groups across blocks)
GROUPED = [(2, 3, 2), (1, 42, 3), (2, 32, 4), (1, 43, 3), (1, 52, 5)]


def qkv(
    B: int, H: int, Q: int, N: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> list[torch.Tensor]:
    """Random q (B, H, Q, d), k and v (B, H, N, d), leaves requiring gradients."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g).to(device, dtype).requires_grad_() for n in (Q, N, N)]


def positions_mask(B: int, Q: int, N: int, device: str = "cpu", seed: int = 0, empty_row: bool = True) -> LongerMask:
    """Random validity and positions; ``empty_row``: query 0 of every row has no allowed key (its position is
    below every key's), else every query has one."""
    g = torch.Generator().manual_seed(seed)
    key_valid = torch.rand(B, N, generator=g) > 0.25
    key_pos = torch.randint(-1, N, (B, N), generator=g)
    query_pos = torch.randint(0, N, (B, Q), generator=g)
    if empty_row:
        query_pos[:, 0] = -2
    else:  # key 0 is a valid key of every query (like LONGER's user token)
        key_valid[:, 0], key_pos[:, 0] = True, -1
    return LongerMask(key_valid.to(device), key_pos.to(device), query_pos.to(device))


def grouped_mask(S: int, G: int, K: int, device: str = "cpu", seed: int = 0, empty_row: bool = True) -> LongerMask:
    """InnerTransformer-like: S samples of G groups of K slots, random valid slots; ``empty_row``: some groups
    have none, else such a group attends all its slots (as in `LongerEncoder.merge_tokens`)."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(S * G, K, generator=g) > 0.4
    if not empty_row:
        valid |= ~valid.any(dim=1, keepdim=True)
    return LongerMask(valid.to(device), groups=G)


def attention_and_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: LongerMask | torch.Tensor | None,
    kernel: str,
    seed: int = 1,
) -> list[torch.Tensor]:
    """[output, dq, dk, dv] for a random upstream gradient."""
    out = longer_attention(q, k, v, mask, kernel)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return [out, dq, dk, dv]


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor], **tol: float) -> None:
    for name, a, e in zip(["out", "dq", "dk", "dv"], actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ settings


def test_unknown_kernel_is_refused_with_the_allowed_names() -> None:
    for make in (
        lambda: LongerEncoder(FEATURES, dim=8, num_heads=2, kernel="triton"),
        lambda: LongerBlock(8, 2, kernel="triton"),
        lambda: longer_attention(*qkv(1, 1, 2, 2, 4, torch.float32), kernel="triton"),
    ):
        with pytest.raises(ValueError, match="kernel='triton'") as error:
            make()
        assert all(name in str(error.value) for name in LONGER_ATTENTION_KERNELS)


def test_flex_without_flex_attention_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(longer, "flex_attention", None)
    with pytest.raises(RuntimeError, match=r"kernel='flex' needs torch\.nn\.attention\.flex_attention"):
        LongerEncoder(FEATURES, dim=8, num_heads=2, kernel="flex")
    with pytest.raises(RuntimeError, match="kernel='flex' needs"):
        longer_attention(*qkv(1, 1, 2, 2, 4, torch.float32), kernel="flex")


@needs_flex
def test_flex_training_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(NotImplementedError, match="no backward pass on CPU"):
        longer_attention(*qkv(1, 1, 2, 2, 4, torch.float32), kernel="flex")


@pytest.mark.parametrize("kernel", ["reference", "sdpa", "flex", "auto"])
def test_kernel_reaches_every_block(kernel: str) -> None:
    if kernel == "flex" and not HAS_FLEX:
        pytest.skip("torch without FlexAttention")
    encoder = LongerEncoder(FEATURES, dim=8, num_layers=3, num_heads=2, merge_k=2, inner_layers=2, kernel=kernel)
    blocks = [*encoder.inner, *encoder.layers]
    assert len(blocks) == 5 and all(block.kernel == kernel for block in blocks)


def test_auto_is_sdpa_for_now_chosen_per_device() -> None:
    assert longer_attention_kernel("auto", "cpu") == "sdpa"
    assert longer_attention_kernel("auto", torch.device("cuda", 0)) == "sdpa"
    assert longer_attention_kernel("flex", "cpu") == "flex"
    q, k, v = qkv(2, 2, 5, 7, 8, torch.float32)
    mask = positions_mask(2, 5, 7)
    assert torch.equal(longer_attention(q, k, v, mask, "auto"), longer_attention(q, k, v, mask, "sdpa"))


# ------------------------------------------------------------------------------------------ the attention function


def test_reference_is_the_explicit_formula_and_gives_zero_without_keys() -> None:
    q, k, v = qkv(2, 2, 5, 7, 8, torch.float64)
    mask = positions_mask(2, 5, 7)
    dense = mask.dense(5)
    assert not dense[:, 0].any() and dense[:, 1:].any(-1).all()
    out = longer_attention(q, k, v, mask, "reference")
    for b in range(2):
        for i in range(5):
            keys = dense[b, i].nonzero().flatten()
            weights = (torch.einsum("hd,hnd->hn", q[b, :, i], k[b, :, keys]) / 8**0.5).softmax(-1)  # (H, n)
            expected = torch.einsum("hn,hnd->hd", weights, v[b, :, keys]) if len(keys) else torch.zeros(2, 8)
            torch.testing.assert_close(out[b, :, i], expected.to(out.dtype))
    dq = torch.autograd.grad(out.sum(), q)[0]
    assert torch.isfinite(dq).all() and torch.all(dq[:, :, 0] == 0)  # no NaN from the fully masked rows


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    B, _, Q, N, _ = shape
    q, k, v = qkv(*shape, dtype)
    tol = FP32 if dtype == torch.float32 else BF16
    for mask in (positions_mask(B, Q, N), positions_mask(B, Q, N).dense(Q), None):  # rule, dense, no mask
        assert_all_close(
            attention_and_grads(q, k, v, mask, "sdpa"), attention_and_grads(q, k, v, mask, "reference"), **tol
        )


@pytest.mark.parametrize("groups", GROUPED, ids=str)
def test_sdpa_matches_reference_grouped(groups: tuple[int, int, int]) -> None:
    S, G, K = groups
    q, k, v = qkv(S * G, 2, K, K, 8, torch.float32)
    mask = grouped_mask(S, G, K)
    assert_all_close(
        attention_and_grads(q, k, v, mask, "sdpa"), attention_and_grads(q, k, v, mask, "reference"), **FP32
    )


@needs_flex
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flex_forward_matches_reference_on_cpu(shape: tuple[int, ...]) -> None:
    B, _, Q, N, _ = shape
    mask = positions_mask(B, Q, N)
    with torch.no_grad():
        for dtype, tol in ((torch.float32, FP32), (torch.bfloat16, BF16)):
            q, k, v = qkv(*shape, dtype)
            out = longer_attention(q, k, v, mask, "flex")
            torch.testing.assert_close(out.float(), longer_attention(q, k, v, mask, "reference").float(), **tol)
            assert torch.all(out[:, :, 0] == 0)  # a query with no allowed key gets 0, as in the reference
        dense = mask.dense(Q)  # a plain boolean mask goes through a mask_mod reading it
        torch.testing.assert_close(longer_attention(q, k, v, dense, "flex"), longer_attention(q, k, v, mask, "flex"))


@needs_flex
@pytest.mark.parametrize("groups", GROUPED, ids=str)
def test_flex_grouped_layout_matches_reference_on_cpu(groups: tuple[int, int, int]) -> None:
    S, G, K = groups
    q, k, v = qkv(S * G, 2, K, K, 8, torch.float32)
    mask = grouped_mask(S, G, K)
    with torch.no_grad():
        torch.testing.assert_close(
            longer_attention(q, k, v, mask, "flex"), longer_attention(q, k, v, mask, "reference"), **FP32
        )


@needs_flex
@pytest.mark.parametrize("K", [1, 3, 4, 5, 64, 100, 128, 200])
def test_grouped_block_mask_lists_exactly_the_blocks_with_allowed_pairs(K: int) -> None:
    """The computed block structure (one for all samples) equals what `create_block_mask` evaluates densely."""
    from torch.nn.attention.flex_attention import create_block_mask

    for G in (1, 2, 31, 43):
        T = G * K
        computed = longer._grouped_block_mask(torch.ones(2, T, dtype=torch.bool), K)
        evaluated = create_block_mask(lambda b, h, q, j: q // K == j // K, None, None, T, T, device="cpu")
        assert computed.BLOCK_SIZE == evaluated.BLOCK_SIZE == (FLEX_BLOCK_SIZE, FLEX_BLOCK_SIZE)
        assert torch.equal(computed.to_dense(), evaluated.to_dense()), (K, G)


def test_empty_inputs() -> None:
    for kernel in ("reference", "sdpa", *(["flex"] if HAS_FLEX else [])):
        with torch.no_grad():
            q, k, v = qkv(0, 2, 3, 3, 8, torch.float32)  # no rows (an empty InnerTransformer batch)
            assert longer_attention(q, k, v, LongerMask(torch.ones(0, 3, dtype=torch.bool)), kernel).shape == (
                0,
                2,
                3,
                8,
            )
            if kernel != "sdpa":  # no keys at all: every query gets 0 (never happens in LONGER)
                q, k, v = qkv(2, 2, 3, 0, 8, torch.float32)
                out = longer_attention(q, k, v, LongerMask(torch.ones(2, 0, dtype=torch.bool)), kernel)
                assert out.shape == (2, 2, 3, 8) and torch.all(out == 0)


# ------------------------------------------------------------------------------------------ the encoder

# lengths: empty, 1, odd; the last case's 127, 128, 129 merged tokens (K = 1) straddle FlexAttention's block
ENCODER_CASES = [
    (1, [0, 1, 5, 7, 2], 7),
    (3, [0, 1, 5, 7, 2], 7),
    (3, [0, 1, 13, 8], 14),
    (1, [127, 128, 129, 0, 1], 129),
]


def make_encoder(merge_k: int, kernel: str, features=FEATURES, dim: int = 16) -> LongerEncoder:
    torch.manual_seed(0)
    return LongerEncoder(
        features,
        dim=dim,
        num_layers=2,
        num_heads=2,
        num_learned_global_tokens=1,
        merge_k=merge_k,
        inner_layers=1,
        num_recent_queries=3,
        output_dim=8,
        kernel=kernel,
    ).eval()


def encoder_outputs_and_grads(encoder: LongerEncoder, batch, autocast: bool = False) -> dict[str, torch.Tensor]:
    with torch.autocast(batch.ts.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = encoder(batch)
    loss = out.target.float().square().sum() + out.user.float().sum()
    names, params = zip(*[(n, p) for n, p in encoder.named_parameters() if p.requires_grad], strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    result = {"target": out.target.detach().float(), "user": out.user.detach().float()}
    result.update({n: g for n, g in zip(names, grads, strict=True) if g is not None})
    return result


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("merge_k", "lengths", "width"), ENCODER_CASES[:3], ids=str)
def test_encoder_sdpa_matches_reference_fp32_and_bf16(merge_k: int, lengths: list[int], width: int) -> None:
    batch = random_batch(FEATURES if width <= 8 else WIDE, lengths, width, seed=3)
    features = FEATURES if width <= 8 else WIDE
    reference, sdpa = make_encoder(merge_k, "reference", features), make_encoder(merge_k, "sdpa", features)
    assert_same(encoder_outputs_and_grads(sdpa, batch), encoder_outputs_and_grads(reference, batch), **FP32)
    assert_same(
        encoder_outputs_and_grads(sdpa, batch, autocast=True),
        encoder_outputs_and_grads(reference, batch, autocast=True),
        **BF16_ENCODER,
    )


@needs_flex
@pytest.mark.parametrize(("merge_k", "lengths", "width"), ENCODER_CASES, ids=str)
def test_encoder_flex_forward_matches_reference_on_cpu(merge_k: int, lengths: list[int], width: int) -> None:
    features = FEATURES if width <= 8 else WIDE
    batch = random_batch(features, lengths, width, seed=3)
    reference, flex = make_encoder(merge_k, "reference", features), make_encoder(merge_k, "flex", features)
    with torch.no_grad():
        expected, out = reference(batch), flex(batch)
        torch.testing.assert_close(out.target, expected.target, **FP32)
        torch.testing.assert_close(out.user, expected.user, **FP32)
        cache = flex.encode_user_sequence(batch)  # the KV-cache split holds for every kernel
        torch.testing.assert_close(flex.forward_from_cache(batch, cache).target, out.target, **FP32)


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@needs_cuda
@needs_flex
@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_attention_matches_reference(kernel: str, dtype: torch.dtype) -> None:
    """Queries without any allowed key only for "flex" (0, as the reference): SDPA's CUDA backends are not
    relied on for them (LONGER never has one: the user token is always a key)."""
    tol = FP32_CUDA if dtype == torch.float32 else BF16
    for shape in [*SHAPES, (4, 2, 35, 300, 32)]:
        B, H, Q, N, d = shape
        q, k, v = qkv(B, H, Q, N, max(d, 16), dtype, "cuda")
        mask = positions_mask(B, Q, N, "cuda", empty_row=kernel == "flex")
        expected = attention_and_grads(q, k, v, mask, "reference")
        assert_all_close(attention_and_grads(q, k, v, mask, kernel), expected, **tol)
    for S, G, K in GROUPED:
        q, k, v = qkv(S * G, 2, K, K, 16, dtype, "cuda")
        mask = grouped_mask(S, G, K, "cuda", empty_row=kernel == "flex")
        expected = attention_and_grads(q, k, v, mask, "reference")
        assert_all_close(attention_and_grads(q, k, v, mask, kernel), expected, **tol)


@pytest.mark.gpu
@needs_cuda
@needs_flex
@pytest.mark.parametrize("kernel", ["sdpa", "flex", "auto"])
@pytest.mark.parametrize(("merge_k", "lengths", "width"), ENCODER_CASES, ids=str)
def test_cuda_encoder_matches_reference(kernel: str, merge_k: int, lengths: list[int], width: int) -> None:
    batch = random_batch(WIDE, lengths, width, seed=3).to("cuda")
    # head dim 16: the smallest FlexAttention's Triton kernels are sure to take
    reference = make_encoder(merge_k, "reference", WIDE, dim=32).cuda()
    other = make_encoder(merge_k, kernel, WIDE, dim=32).cuda()
    assert_same(encoder_outputs_and_grads(other, batch), encoder_outputs_and_grads(reference, batch), **FP32_CUDA)
    assert_same(
        encoder_outputs_and_grads(other, batch, autocast=True),
        encoder_outputs_and_grads(reference, batch, autocast=True),
        **BF16_ENCODER,
    )
    if kernel == "auto":  # chosen per call: the same module back on the CPU runs there
        cpu = other.cpu()(random_batch(WIDE, lengths, width, seed=3))
        torch.testing.assert_close(cpu.target, reference.cpu()(random_batch(WIDE, lengths, width, seed=3)).target)
