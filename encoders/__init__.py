"""Sequence encoders: `HSTUEncoder` (HSTU, arXiv 2402.17152) and `LongerEncoder` (LONGER, arXiv 2505.04421)
on top of the shared `FeatureEmbeddings`."""

from encoders.base import EncoderOutput, SequenceEncoder
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

__all__ = [
    "HSTU_ATTENTION_KERNELS",
    "EncoderOutput",
    "FeatureEmbeddings",
    "HSTUEncoder",
    "HSTULayer",
    "LongerBlock",
    "LongerEncoder",
    "LongerSequenceCache",
    "RelativeAttentionBias",
    "SequenceEncoder",
    "bucket_position_distance",
    "bucket_time_delta",
    "hstu_attention",
    "hstu_attention_kernel",
    "symlog",
]
