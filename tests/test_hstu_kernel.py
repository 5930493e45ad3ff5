"""The Triton HSTU attention kernel (`encoders.kernels.hstu_attention.hstu_mha`) against its PyTorch reference.

Forward outputs and every input gradient (q, k, v and both relative-bias tables) on random inputs:
odd lengths, empty and length-1 rows, lengths across block boundaries; causal, constant ``n``,
target-aware, semi-local (window + global prefix) and explicit logical positions, with and without
the relative position/time bias. On the CPU the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest; blocks of 16), on a GPU compiled (marked ``gpu``).

Tolerances (max abs difference, inputs of unit scale, outputs of scale ~0.1-1):
- float32: 2e-5 against the float32 reference (kernel and reference differ only in summation order);
- bfloat16: the kernel's error against the float32 reference is at most 2× the bf16 reference's own
  error against it, plus 2e-3 (both round P and dS to bf16 before their products).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import FEATURES

from encoders import HSTUEncoder, UltraHSTUEncoder
from encoders.kernels.hstu_attention import (
    attention_mask,
    check_positions,
    hstu_mha,
    hstu_mha_reference,
    interpreting,
    triton_available,
)
from mtrank.data.synth import random_batch

pytest.importorskip("triton")

CPU_OK = interpreting()
cpu_only = pytest.mark.skipif(not CPU_OK, reason="needs TRITON_INTERPRET=1 (set by conftest without CUDA)")

VARIANTS: dict[str, dict[str, Any]] = {
    "causal": {},
    "constant_n": {"n": 50.0},
    "targets": {"targets": True},
    "semi_local": {"local_window": 5, "global_prefix": 3},
    "semi_local_targets": {"local_window": 7, "global_prefix": 0, "targets": True},
    "positions_window": {"positions": True, "local_window": 6, "global_prefix": 4},
    "rab": {"rab": True},
    "rab_targets_positions": {"rab": True, "targets": True, "positions": True},
    "rab_semi_local": {"rab": True, "local_window": 9, "global_prefix": 2, "n": 20.0},
}


def make_inputs(
    lengths: list[int], N: int, H: int, d_qk: int, d_v: int, dtype: torch.dtype, device: str, seed: int = 0, **v: Any
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any], list[torch.Tensor]]:
    """Random (q, k, v, lengths), the keyword arguments of a variant and the tensors to differentiate."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    q, k, val = rand(B, N, H, d_qk), rand(B, N, H, d_qk), rand(B, N, H, d_v)
    lens = torch.tensor(lengths, device=device)
    kwargs: dict[str, Any] = {key: v[key] for key in ("n", "local_window", "global_prefix") if key in v}
    grads = [q, k, val]
    if v.get("targets"):
        kwargs["num_targets"] = torch.tensor([min(L, 1 + i % 3) for i, L in enumerate(lengths)], device=device)
    if v.get("positions"):
        kwargs["position"] = (torch.cumsum(torch.randint(1, 4, (B, N), generator=g), 1) - 1).to(device)
    if v.get("rab"):
        pw = (torch.randn(16, H, generator=g) * 0.5).to(device).requires_grad_()
        tw = (torch.randn(64, H, generator=g) * 0.5).to(device).requires_grad_()
        ts = torch.cumsum(torch.randint(0, 5000, (B, N), generator=g), 1).to(device)
        kwargs.update(position_weight=pw, time_weight=tw, ts=ts, max_distance=3 * N)
        grads += [pw, tw]
    return (q, k, val, lens), kwargs, grads


def compare(
    lengths: list[int], N: int, dtype: torch.dtype, device: str, variant: dict[str, Any], d_qk: int = 16, d_v: int = 24
) -> None:
    (q, k, v, lens), kwargs, leaves = make_inputs(lengths, N, 2, d_qk, d_v, dtype, device, **variant)
    out = hstu_mha(q, k, v, lens, alpha=0.3, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref = hstu_mha_reference(q, k, v, lens, alpha=0.3, **kwargs)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    assert out.shape == ref.shape and out.dtype == dtype
    pad = torch.arange(N, device=device)[None, :] >= lens[:, None]
    assert bool((out[pad] == 0).all()), "padded queries must output 0"
    if dtype == torch.float32:
        names = ["out", "dq", "dk", "dv", "dpos", "dtime"][: 1 + len(grads)]
        for name, a, b in zip(names, [out, *grads], [ref, *ref_grads], strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        return
    # bf16: compare both with a float32 reference built from the same (bf16-valued) inputs
    f32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    kw32 = dict(kwargs)
    extra = []
    if "position_weight" in kwargs:
        kw32["position_weight"] = kwargs["position_weight"].detach().clone().requires_grad_()
        kw32["time_weight"] = kwargs["time_weight"].detach().clone().requires_grad_()
        extra = [kw32["position_weight"], kw32["time_weight"]]
    exact = hstu_mha_reference(*f32, lens, alpha=0.3, **kw32)
    exact_grads = torch.autograd.grad(exact, [*f32, *extra], grad_out.float())
    names = ["out", "dq", "dk", "dv", "dpos", "dtime"][: 1 + len(grads)]
    for name, a, b, e in zip(names, [out, *grads], [ref, *ref_grads], [exact, *exact_grads], strict=True):
        err, ref_err = (a.float() - e).abs().max().item(), (b.float() - e).abs().max().item()
        assert err <= 2 * ref_err + 2e-3 * max(1.0, e.abs().max().item()), f"{name}: kernel {err} vs bf16 ref {ref_err}"


# ------------------------------------------------------------------------------------------ CPU (interpreter)


@cpu_only
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference_float32(variant: str) -> None:
    # blocks of 16: 37 spans three blocks, 16/17 sit on a boundary, 1 and 0 are the edge cases
    compare([37, 16, 17, 1, 0], 37, torch.float32, "cpu", VARIANTS[variant])


@cpu_only
@pytest.mark.parametrize("variant", ["causal", "targets", "rab_semi_local"])
def test_matches_reference_bfloat16(variant: str) -> None:
    compare([33, 15, 1, 0], 33, torch.bfloat16, "cpu", VARIANTS[variant])


@cpu_only
def test_odd_head_dims_and_strided_inputs() -> None:
    # d_qk 12 and d_v 20 (padded to 16/32 inside), q/k/v as views of one fused projection
    B, N, H, dqk, dv = 2, 19, 3, 12, 20
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(B, N, H * (2 * dqk + dv), generator=g, requires_grad=True)
    q, k, v = fused.split([H * dqk, H * dqk, H * dv], dim=-1)
    q, k, v = q.view(B, N, H, dqk), k.view(B, N, H, dqk), v.view(B, N, H, dv)
    lens = torch.tensor([19, 6])
    out = hstu_mha(q, k, v, lens, alpha=0.5)
    (grad,) = torch.autograd.grad(out.square().sum(), fused)
    ref = hstu_mha_reference(q, k, v, lens, alpha=0.5)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), fused)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=1e-4)


@cpu_only
def test_time_buckets_match_the_reference_at_their_thresholds() -> None:
    # time differences exactly at, just under and just over every bucket threshold: the in-kernel
    # log guess is corrected against the reference's own thresholds, so no bucket may differ
    from encoders.hstu import bucket_time_delta
    from encoders.kernels.hstu_attention import _time_thresholds

    thresholds = _time_thresholds(40, torch.device("cpu"))[1:40]
    deltas = torch.cat([thresholds - 1, thresholds, thresholds + 1]).clamp(min=0)
    target = torch.arange(1, 40)
    assert bool((bucket_time_delta(thresholds, 40) >= target).all())  # entry b: the first |Δt| of bucket >= b
    assert bool((bucket_time_delta(thresholds - 1, 40) < target).all())
    N = deltas.numel() + 1
    ts = torch.cat([torch.zeros(1, dtype=torch.long), deltas]).unsqueeze(0)  # key 0 at t=0, queries at the deltas
    H = 1
    tw = torch.randn(40, H).requires_grad_()
    q = torch.zeros(1, N, H, 16)
    k = torch.zeros(1, N, H, 16)
    v = torch.zeros(1, N, H, 16)
    v[0, 0, 0, 0] = 1.0  # out[i, 0] = SiLU(rab(i, 0)) / n_i: reads back the bias against key 0
    lens = torch.tensor([N])
    out = hstu_mha(q, k, v, lens, alpha=1.0, n=1.0, ts=ts, time_weight=tw)
    ref = hstu_mha_reference(q, k, v, lens, alpha=1.0, n=1.0, ts=ts, time_weight=tw)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_reference_mask_rule() -> None:
    lens = torch.tensor([5])
    m = attention_mask(lens, 6, num_targets=torch.tensor([2]))[0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # first candidate: the history and itself
            [1, 1, 1, 0, 1, 0],  # second candidate: not the first
            [0, 0, 0, 0, 0, 0],  # padding
        ]
    )
    assert torch.equal(m, expected)
    m = attention_mask(torch.tensor([6]), 6, local_window=2, global_prefix=1)[0].int()
    assert m[5].tolist() == [1, 0, 0, 0, 1, 1]  # the prefix key 0 and the window of 2


def test_bad_inputs_raise() -> None:
    q = torch.randn(2, 8, 2, 16)
    lens = torch.tensor([8, 3])
    with pytest.raises(ValueError, match="k must have shape"):
        hstu_mha(q, q[:, :4], q, lens, alpha=1.0)
    with pytest.raises(ValueError, match="lengths must have shape"):
        hstu_mha(q, q, q, lens[:1], alpha=1.0)
    with pytest.raises(ValueError, match="time_weight needs ts"):
        hstu_mha(q, q, q, lens, alpha=1.0, time_weight=torch.zeros(8, 2))
    with pytest.raises(ValueError, match="max_distance"):
        hstu_mha(q, q, q, lens, alpha=1.0, position_weight=torch.zeros(8, 2))
    with pytest.raises(ValueError, match="share a dtype"):
        hstu_mha(q, q.half(), q, lens, alpha=1.0)
    with pytest.raises(ValueError, match="increase strictly"):
        check_positions(torch.tensor([[0, 2, 2, 5]]), torch.tensor([4]))
    check_positions(torch.tensor([[0, 2, 3, 0]]), torch.tensor([3]))  # padding may hold anything


def test_available_only_on_cuda_or_interpreter() -> None:
    assert triton_available("cpu") == interpreting()


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_matches_reference(variant: str, dtype: torch.dtype) -> None:
    # lengths across the autotuned block sizes (32..128), empty and length-1 rows
    compare([300, 255, 256, 129, 64, 1, 0], 300, dtype, "cuda", VARIANTS[variant], d_qk=64, d_v=64)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["causal", "semi_local", "rab_targets_positions"])
def test_gpu_long_rows(variant: str) -> None:
    v = dict(VARIANTS[variant])
    if "local_window" in v:
        v.update(local_window=300, global_prefix=64)
    compare([1500, 1000, 777], 1500, torch.bfloat16, "cuda", v, d_qk=64, d_v=64)


# ------------------------------------------------------------------------------------------ encoders


def _encoder_outputs(encoder: torch.nn.Module, batch: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out = encoder(batch)
    loss = out.target.square().sum() + out.user.square().sum()
    params = [p for p in encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [out.target, out.user], [
        g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)
    ]


def _compare_encoders(build: Any, batch: Any, device: str = "cpu", atol: float = 2e-5) -> None:
    outs = {}
    for kernel in ("reference", "triton"):
        torch.manual_seed(0)
        encoder = build(kernel).to(device).train()
        torch.manual_seed(1)  # same dropout masks
        outs[kernel] = _encoder_outputs(encoder, batch.to(device))
    for a, b in zip(outs["reference"][0] + outs["reference"][1], outs["triton"][0] + outs["triton"][1], strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)


LONG = dataclasses.replace(FEATURES, max_len=40)  # the encoder tests' features, longer histories


@cpu_only
@pytest.mark.parametrize("norm", ["num_keys", "max_len"])
def test_hstu_encoder_kernel_matches_reference(norm: str) -> None:
    batch = random_batch(LONG, [40, 17, 16, 1, 0], 40, seed=2)
    _compare_encoders(lambda kernel: HSTUEncoder(LONG, dim=32, num_heads=2, attention_norm=norm, kernel=kernel), batch)


ULTRA_SETTINGS = {
    "sla_truncation_streams": {
        "num_context_tokens": 2,
        "local_window": 6,
        "global_prefix": 3,
        "full_layers": 1,
        "tail_len": 12,
        "streams": [{"name": "all"}, {"name": "engaged", "channel": "action", "values": [1, 2], "max_len": 20}],
    },
    "interleaved_full": {"merge_action_item": False, "num_context_tokens": 1, "attention_norm": "max_len"},
}


@cpu_only
@pytest.mark.parametrize("setting", list(ULTRA_SETTINGS))
def test_ultra_hstu_encoder_kernel_matches_reference(setting: str) -> None:
    batch = random_batch(LONG, [40, 23, 16, 1, 0], 40, seed=3)
    kwargs = ULTRA_SETTINGS[setting]
    _compare_encoders(lambda kernel: UltraHSTUEncoder(LONG, dim=32, num_heads=2, kernel=kernel, **kwargs), batch)


def test_auto_picks_the_reference_off_cuda_and_triton_refuses_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from encoders.hstu import resolve_kernel
    from encoders.kernels import hstu_attention

    assert resolve_kernel("auto", torch.device("cpu")) == "reference"  # also under the interpreter
    assert resolve_kernel("reference", torch.device("cpu")) == "reference"
    monkeypatch.setattr(hstu_attention, "triton_available", lambda device: False)
    with pytest.raises(RuntimeError, match=r"kernel='triton' cannot run on cpu.*kernel: auto"):
        resolve_kernel("triton", torch.device("cpu"), "HSTUEncoder")
    with pytest.raises(ValueError, match="unknown HSTU attention kernel 'flash'"):
        HSTUEncoder(LONG, kernel="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["num_keys", "max_len"])
def test_gpu_hstu_encoder_kernel_matches_reference(norm: str) -> None:
    batch = random_batch(LONG, [40, 17, 16, 1, 0, 33], 40, seed=2)
    _compare_encoders(
        lambda kernel: HSTUEncoder(LONG, dim=64, num_heads=2, attention_norm=norm, kernel=kernel),
        batch,
        "cuda",
        atol=1e-4,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("setting", list(ULTRA_SETTINGS))
def test_gpu_ultra_hstu_encoder_kernel_matches_reference(setting: str) -> None:
    batch = random_batch(LONG, [40, 23, 16, 1, 0, 39], 40, seed=3)
    kwargs = ULTRA_SETTINGS[setting]
    _compare_encoders(
        lambda kernel: UltraHSTUEncoder(LONG, dim=64, num_heads=2, kernel=kernel, **kwargs), batch, "cuda", atol=1e-4
    )
