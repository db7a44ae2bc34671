"""Read text→image attention inside a diffusers denoiser through its attention-processor API.

`capture_cross_attention(model)` swaps the processor of every layer where image queries read
the text: cross-attention (`attn2`) in a UNet, for `CrossAttentionRecorder`, which computes
the layer exactly as diffusers' classic `AttnProcessor` does; joint attention in an MMDiT
(SD3), for `JointAttentionRecorder`, as `JointAttnProcessor2_0` does; Flux's double blocks,
for `FluxJointAttentionRecorder`, as `FluxAttnProcessor` does (its single blocks, one
stream of text and image, are not recorded). Each keeps, per layer,
the probabilities image queries put on text tokens (batch·heads, image queries, text tokens)
and what those tokens' values add to the image output, P_text·V_text, before the output
projection (in a UNet all of the layer's output). DUGE's loss and the evaluation heat maps
read them; gradients flow through them. The original processors come back on exit.
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


class JointAttentionRecorder:
    """Attention processor for MMDiT joint attention (image and text tokens attend together)
    that records the image-query / text-key block."""

    def __init__(self, name: str, store: dict[str, dict[str, torch.Tensor]]):
        self.name, self.store = name, store

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: joint attention without text tokens")
        batch, heads = hidden_states.shape[0], attn.heads

        def split(x, norm=None):
            x = x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = split(attn.to_q(hidden_states), attn.norm_q)
        k = split(attn.to_k(hidden_states), attn.norm_k)
        v = split(attn.to_v(hidden_states))
        eq = split(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)
        ek = split(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)
        ev = split(attn.add_v_proj(encoder_hidden_states))
        n_img = q.shape[2]
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)
        text_probs = probs[:, :, :n_img, n_img:]
        text_out = text_probs @ ev
        self.store[self.name] = {"probs": text_probs.flatten(0, 1), "output": text_out.flatten(0, 1)}
        out = (probs @ v).transpose(1, 2).reshape(batch, -1, heads * q.shape[-1])
        image, text = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class FluxJointAttentionRecorder:
    """Flux's double-block attention (text tokens first, rotary positions on both), computed
    as diffusers' `FluxAttnProcessor` does, recording the image-query / text-key block."""

    def __init__(self, name: str, store: dict[str, dict[str, torch.Tensor]]):
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, **kwargs):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: joint attention without text tokens")

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        q, k, v = (attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states))),
                   heads(attn.to_v(hidden_states)))
        eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        ev = heads(attn.add_v_proj(encoder_hidden_states))
        n_txt = eq.shape[1]
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # batch, heads, tokens, dim
        probs = (q @ k.transpose(-1, -2) * attn.head_dim ** -0.5).softmax(dim=-1)
        text_probs = probs[:, :, n_txt:, :n_txt]
        self.store[self.name] = {"probs": text_probs.flatten(0, 1),
                                 "output": (text_probs @ v[:, :, :n_txt]).flatten(0, 1)}
        out = (probs @ v).transpose(1, 2).flatten(2, 3)
        text, image = out[:, :n_txt], out[:, n_txt:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def _recorder(model, name: str):
    """The recorder class for a processor name, or None where image queries do not read text."""
    attn = model.get_submodule(name.rsplit(".processor", 1)[0])
    if getattr(attn, "is_cross_attention", False):
        return CrossAttentionRecorder
    if type(attn).__name__ == "FluxAttention":
        return FluxJointAttentionRecorder if getattr(attn, "added_kv_proj_dim", None) is not None else None
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return JointAttentionRecorder
    return None


def cross_attention_names(model) -> list[str]:
    """Processor names of every layer where image queries read the text (UNet `attn2`,
    MMDiT joint attention)."""
    return [n for n in model.attn_processors if _recorder(model, n) is not None]


def _install_recorders(model, store: dict) -> tuple[dict, list]:
    """Put a recorder writing into `store` on every layer where image queries read the text;
    returns the processors it replaced (all of them, to put back) and the recorders."""
    original, processors, recorders = model.attn_processors, {}, []
    for name, proc in original.items():
        recorder = _recorder(model, name)
        processors[name] = recorder(name, store) if recorder else proc
        if recorder:
            recorders.append(processors[name])
    model.set_attn_processor(processors)
    return original, recorders


def keep_recorders(model, on: bool) -> None:
    """Install the recorders for good (`on`), recording only inside `capture_cross_attention`,
    or put the original processors back. Needed with gradient checkpointing: the backward
    pass recomputes each block's forward, and must meet the same processor the forward did."""
    if on and getattr(model, "_obliviate_recorders", None) is None:
        original, recorders = _install_recorders(model, {})
        model._obliviate_recorders, model._obliviate_original = recorders, original
    elif not on and getattr(model, "_obliviate_recorders", None) is not None:
        model.set_attn_processor(model._obliviate_original)
        model._obliviate_recorders = model._obliviate_original = None


@contextmanager
def capture_cross_attention(model) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
    """Within the block, each forward of `model` fills the yielded dict: layer -> probs/output."""
    kept = getattr(model, "_obliviate_recorders", None)
    if kept is not None:  # installed for good: point them at this block's dict, then at a scratch one
        store: dict[str, dict[str, torch.Tensor]] = {}
        for recorder in kept:
            recorder.store = store
        try:
            yield store
        finally:
            for recorder in kept:
                recorder.store = {}
        return
    store = {}
    original, _ = _install_recorders(model, store)
    try:
        yield store
    finally:
        model.set_attn_processor(original)
