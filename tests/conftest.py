"""Shared fixtures: one small synthetic data set (written once per test session).

Without CUDA, Triton kernels run under Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here,
before any kernel module is imported (Triton reads it when a kernel is defined). The encoders' ``auto``
kernel setting still picks the PyTorch reference on the CPU, so only the kernel tests pay for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from mtrank.data.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthConfig, dict[str, Path]]:
    """A ~20k-sample synthetic set (config, paths); histories of ~100 behaviours, max_len 32."""
    config = SynthConfig(
        num_users=200,
        num_items=300,
        num_categories=10,
        history_mean=80,
        samples_per_user=100,
        max_len=32,
        chunk_users=64,
        seed=3,
    )
    return config, generate(config, tmp_path_factory.mktemp("synth"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
