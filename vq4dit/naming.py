"""Which layers a DiT block has and which ones get quantized (diffusers module names).

`layer_kind` / `layer_type` / `block_index` name a layer for reports and the app's heatmap;
`default_filter` is `quantize`'s choice of target layers (the spec's "Which layers").
"""
from __future__ import annotations

import re

import torch.nn as nn

# Layer kinds inside a DiT block (diffusers names): one heatmap column per kind in the app.
LAYER_KINDS = {
    "q": r"attn\d*\.to_q$",
    "k": r"attn\d*\.to_k$",
    "v": r"attn\d*\.to_v$",
    "out": r"attn\d*\.to_out\.0$",
    "fc1": r"ff\.net\.0\.proj$",
    "fc2": r"ff\.net\.2$",
    "adaLN": r"norm1\.linear$",
}


def layer_kind(name: str) -> str:
    """'transformer_blocks.3.attn1.to_q' -> 'q'; unknown layers keep their last name part."""
    for kind, pattern in LAYER_KINDS.items():
        if re.search(pattern, name):
            return kind
    return name.rsplit(".", 1)[-1]


def layer_type(name: str) -> str:
    """Coarser grouping for reports: q, k and v are one type ('qkv')."""
    kind = layer_kind(name)
    return "qkv" if kind in ("q", "k", "v") else kind if kind in LAYER_KINDS else "other"


def block_index(name: str) -> int:
    m = re.search(r"transformer_blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Target Linears inside `transformer_blocks`, skipping the timestep/label embedders."""
    return (isinstance(module, nn.Linear) and fqn.startswith("transformer_blocks.")
            and ".emb." not in fqn)
