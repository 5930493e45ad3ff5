"""Fused attention kernels of the encoders, each beside its plain PyTorch reference.

- `encoders.kernels.hstu_attention`: HSTU pointwise attention (``SiLU(α QKᵀ + rab) / n · V``) in Triton,
  forward and backward, with causal, target-aware and semi-local masks and an in-kernel relative
  position/time bias; `hstu_mha` (the kernel) and `hstu_mha_reference` (dense PyTorch).

`triton_available` says whether the Triton kernels can run on a tensor's device: CUDA with Triton
installed, or any device under Triton's interpreter (``TRITON_INTERPRET=1``, used by the CPU tests).
"""

from encoders.kernels.hstu_attention import hstu_mha, hstu_mha_reference, triton_available

__all__ = ["hstu_mha", "hstu_mha_reference", "triton_available"]
