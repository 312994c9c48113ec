"""Packed variable-length causal attention (per sequence / per segment with shared prefix)."""

from fastrm.attention.gather import RowGather, gather_rows
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
    backend_unavailable_reason,
    check_backend,
    flash_attn_available,
    flash_attn_unavailable_reason,
    flash_layout,
    select_backend,
    varlen_attention,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "KeyGather",
    "RowGather",
    "SegmentGroup",
    "SegmentPlan",
    "PackedSelfAttention",
    "VarlenAttentionCall",
    "VarlenMetadata",
    "backend_unavailable_reason",
    "check_backend",
    "enable_varlen_attention",
    "flash_attn_available",
    "flash_attn_unavailable_reason",
    "flash_layout",
    "gather_rows",
    "packed_metadata",
    "select_backend",
    "varlen_attention",
]
