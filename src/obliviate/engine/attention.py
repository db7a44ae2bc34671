"""Read cross-attention inside a diffusers UNet through its attention-processor API.

`capture_cross_attention(unet)` swaps the processor of every cross-attention layer (`attn2`)
for `CrossAttentionRecorder`, which computes the layer exactly as diffusers' classic
`AttnProcessor` does and also keeps, per layer, the attention probabilities
`softmax(QKᵀ/√d)` (batch·heads, queries, tokens) and the attended output `softmax(QKᵀ/√d)V`
before the output projection. DUGE's loss and the evaluation heat maps read them; gradients
flow through them. The original processors come back when the context exits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers.models.attention_processor import Attention


class CrossAttentionRecorder:
    """Attention processor for cross-attention layers that records what it computes."""

    def __init__(self, name: str, store: dict[str, dict[str, torch.Tensor]]):
        self.name, self.store = name, store

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3 or attn.residual_connection:
            raise ValueError(f"{self.name}: not a Stable Diffusion cross-attention layer")
        batch, tokens, _ = encoder_hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, mask)
        attended = torch.bmm(probs, value)
        self.store[self.name] = {"probs": probs, "output": attended}
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(attended)))
        return out / attn.rescale_output_factor


def cross_attention_names(unet) -> list[str]:
    """Processor names of every cross-attention layer of a UNet2DConditionModel."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextmanager
def capture_cross_attention(unet) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Within the block, each UNet forward fills the yielded dict: layer -> probs/output."""
    original = unet.attn_processors
    store: dict[str, dict[str, torch.Tensor]] = {}
    processors = {
        name: CrossAttentionRecorder(name, store) if name.endswith("attn2.processor") else proc
        for name, proc in original.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield store
    finally:
        unet.set_attn_processor(original)
