"""Capture of UNet intermediate features and cross-attention probabilities during one VPD forward pass.

VPD reads four feature maps from inside the UNet's up blocks and, for segmentation and referring segmentation, the
cross-attention probabilities of the text tokens. Both are collected into a per-call record:

* the features by forward hooks on the tapped modules;
* the attention maps by :class:`CrossAttentionMapProcessor`, installed only on the `attn2` layers whose maps are
  used; every other attention layer keeps its default (SDPA) processor.

Nothing is stored outside :meth:`ForwardRecorder.record`, so calls made outside a VPD forward (for instance the
recomputation of a gradient-checkpointed block during backward) leave no trace. Records are kept per thread and as a
stack, so concurrent threads and nested forwards do not mix their tensors.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.models.attention_processor import Attention


class ForwardRecorder:
    """Collects named tensors produced while :meth:`record` is active (per thread, re-entrant)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _stack(self) -> list[dict[str, list[torch.Tensor]]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextmanager
    def record(self) -> Iterator[dict[str, list[torch.Tensor]]]:
        entries: dict[str, list[torch.Tensor]] = defaultdict(list)
        stack = self._stack()
        stack.append(entries)
        try:
            yield entries
        finally:
            stack.pop()

    @property
    def active(self) -> bool:
        return bool(self._stack())

    def put(self, key: str, tensor: torch.Tensor) -> None:
        stack = self._stack()
        if stack:
            stack[-1][key].append(tensor)

    def hook(self, key: str) -> RecordOutputHook:
        """A forward hook that records the module's output under `key`."""
        return RecordOutputHook(self, key)

    # threading.local cannot be pickled or deep-copied; a copy starts with no active record.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()


class RecordOutputHook:
    """Forward hook storing a module's output in a :class:`ForwardRecorder` (an object, not a closure, so that a
    deep copy of the model gets hooks bound to the copy's recorder)."""

    def __init__(self, recorder: ForwardRecorder, key: str) -> None:
        self.recorder = recorder
        self.key = key

    def __call__(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.recorder.put(self.key, output[0] if isinstance(output, tuple) else output)


class CrossAttentionMapProcessor:
    r"""
    Attention processor for a UNet cross-attention (`attn2`) layer that also records its attention probabilities.

    It computes `P = softmax(Q K^T / sqrt(d))` explicitly (the probabilities are needed), returns the usual output
    `P V`, and while a recording is active stores `mean_heads(P)` of shape `(batch, height * width, tokens)` under
    `key`. It only supports the plain cross-attention of Stable Diffusion UNets (no group/spatial norm, no residual),
    which :func:`install_cross_attention_capture` checks.
    """

    def __init__(self, recorder: ForwardRecorder, key: str, detach: bool = True) -> None:
        self.recorder = recorder
        self.key = key
        self.detach = detach

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError(f"{type(self).__name__} is for cross-attention layers; it got no encoder_hidden_states.")
        out, probs = explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.recorder.active:
            mean_probs = _mean_over_heads(probs, hidden_states.shape[0], attn.heads)
            self.recorder.put(self.key, mean_probs.detach() if self.detach else mean_probs)
        return out


def explicit_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a plain (SD UNet) `Attention` layer with materialised probabilities: returns the layer output
    `(B, N, C)` and the probabilities `(B * heads, N, tokens)` (`softmax(Q K^T * scale)`, baddbmm + softmax)."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch_size, tokens, _ = context.shape
    attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch_size)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    probs = attn.get_attention_scores(query, key, attention_mask)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    out = attn.to_out[1](attn.to_out[0](out))
    return out / attn.rescale_output_factor, probs


def _mean_over_heads(probs: torch.Tensor, batch_size: int, heads: int) -> torch.Tensor:
    """`(B * heads, N, tokens)` probabilities -> their mean over the heads, `(B, N, tokens)`."""
    return probs.unflatten(0, (batch_size, heads)).mean(dim=1)


def _check_plain_attention(module: Attention, name: str, purpose: str) -> None:
    """The explicit processors here implement Stable Diffusion's plain attention only."""
    unsupported = module.group_norm, module.spatial_norm, module.norm_cross
    if any(part is not None for part in unsupported) or module.residual_connection:
        raise ValueError(f"Cannot {purpose} `{name}`: unsupported attention variant.")


class ReferenceAttentionProcessor:
    r"""
    The attention of the official VPD code, for benchmarks and equivalence tests: probabilities are materialised in
    every layer (self-attention included, 4096 x 4096 per head at a 64² latent) and, as its `AttentionStore`,
    `mean_heads(P)` is kept for every layer with at most `max_stored_queries` queries (32² by default).
    """

    def __init__(self, store: list[torch.Tensor], max_stored_queries: int = 32 * 32) -> None:
        self.store = store
        self.max_stored_queries = max_stored_queries

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        out, probs = explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        if hidden_states.shape[1] <= self.max_stored_queries:
            self.store.append(_mean_over_heads(probs, hidden_states.shape[0], attn.heads).detach())
        return out


@contextmanager
def reference_attention(unet: torch.nn.Module, max_stored_queries: int = 32 * 32) -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention layer of `unet` runs as the official VPD code does
    (:class:`ReferenceAttentionProcessor`; VPD's own capture layers keep recording); yields the attention store, and
    restores the previous processors on exit."""
    saved = unet.attn_processors
    store: list[torch.Tensor] = []
    reference = ReferenceAttentionProcessor(store, max_stored_queries)
    for name, processor in saved.items():
        module = unet.get_submodule(name.removesuffix(".processor"))
        if not isinstance(processor, CrossAttentionMapProcessor):
            _check_plain_attention(module, name, "emulate the reference attention in")
            module.set_processor(reference)
    try:
        yield store
    finally:
        unet.set_attn_processor(saved)


def cross_attention_layers(unet: torch.nn.Module, level: int) -> list[tuple[str, Attention]]:
    """The `attn2` modules found by walking the UNet's down and up blocks at `level` (0 = the latent resolution), in
    module order. VPD installs its capture on the names `vpd_hf.backbones.backbone_layout` derives from the config;
    this walk of the built model is the independent check of those names."""
    up_index = len(unet.up_blocks) - 1 - level
    blocks = {f"down_blocks.{level}": unet.down_blocks[level], f"up_blocks.{up_index}": unet.up_blocks[up_index]}
    layers = []
    for prefix, block in blocks.items():
        for name, module in block.named_modules():
            if isinstance(module, Attention) and name.endswith("attn2"):
                layers.append((f"{prefix}.{name}", module))
    return layers


def install_cross_attention_capture(
    unet: torch.nn.Module, layers: Mapping[int, Sequence[str]], recorder: ForwardRecorder, detach: bool
) -> dict[int, int]:
    """Install :class:`CrossAttentionMapProcessor` on the `attn2` modules named in `layers` (level -> module names),
    recording under the level's key; return the number of layers per level."""
    counts = {}
    for level, names in layers.items():
        for name in names:
            module = unet.get_submodule(name)
            if not isinstance(module, Attention):
                raise ValueError(f"Cannot capture attention maps of `{name}`: it is a {type(module).__name__}.")
            _check_plain_attention(module, name, "capture attention maps of")
            module.set_processor(CrossAttentionMapProcessor(recorder, attention_key(level), detach=detach))
        counts[level] = len(names)
    return counts


def attention_key(level: int) -> str:
    return f"attention_maps.level{level}"


__all__ = [
    "CrossAttentionMapProcessor",
    "ForwardRecorder",
    "RecordOutputHook",
    "ReferenceAttentionProcessor",
    "attention_key",
    "cross_attention_layers",
    "explicit_attention",
    "install_cross_attention_capture",
    "reference_attention",
]
