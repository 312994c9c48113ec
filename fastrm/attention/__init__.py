"""Packed variable-length causal attention (per sequence / per segment with shared prefix)."""

from fastrm.attention.integration import (
    PackedSelfAttention,
    VarlenAttentionCall,
    enable_varlen_attention,
    packed_metadata,
)
from fastrm.attention.metadata import KeyGather, SegmentGroup, SegmentPlan, VarlenMetadata
from fastrm.attention.varlen import (
    BACKENDS,
    ENV_VAR,
    check_backend,
    flash_attn_available,
    flash_layout,
    select_backend,
    varlen_attention,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KeyGather",
    "SegmentGroup",
    "SegmentPlan",
    "PackedSelfAttention",
    "VarlenAttentionCall",
    "VarlenMetadata",
    "check_backend",
    "enable_varlen_attention",
    "flash_attn_available",
    "flash_layout",
    "packed_metadata",
    "select_backend",
    "varlen_attention",
]
