"""Sequence encoders: `HSTUEncoder` (HSTU, arXiv 2402.17152), `LongerEncoder` (LONGER, arXiv 2505.04421) and
`UltraHSTUEncoder` (ULTRA-HSTU, arXiv 2602.16986) on top of the shared `FeatureEmbeddings`, and the baselines
`NoHistoryEncoder` (no history) and `MeanPoolEncoder` (mean-pooled history)."""

from encoders.base import EncoderOutput, SequenceEncoder
from encoders.baselines import MeanPoolEncoder, NoHistoryEncoder
from encoders.embeddings import FeatureEmbeddings, symlog
from encoders.hstu import (
    HSTU_ATTENTION_KERNELS,
    HSTUEncoder,
    HSTULayer,
    RelativeAttentionBias,
    bucket_position_distance,
    bucket_time_delta,
    hstu_attention,
    hstu_attention_kernel,
)
from encoders.longer import LongerBlock, LongerEncoder, LongerSequenceCache
from encoders.ultra_hstu import (
    SLA_ATTENTION_KERNELS,
    TransducerStream,
    UltraHSTUEncoder,
    UltraHSTULayer,
    sla_attention,
    sla_attention_kernel,
    sla_mask,
)

__all__ = [
    "HSTU_ATTENTION_KERNELS",
    "SLA_ATTENTION_KERNELS",
    "EncoderOutput",
    "FeatureEmbeddings",
    "HSTUEncoder",
    "HSTULayer",
    "LongerBlock",
    "LongerEncoder",
    "LongerSequenceCache",
    "MeanPoolEncoder",
    "NoHistoryEncoder",
    "RelativeAttentionBias",
    "SequenceEncoder",
    "TransducerStream",
    "UltraHSTUEncoder",
    "UltraHSTULayer",
    "bucket_position_distance",
    "bucket_time_delta",
    "hstu_attention",
    "hstu_attention_kernel",
    "sla_attention",
    "sla_attention_kernel",
    "sla_mask",
    "symlog",
]
