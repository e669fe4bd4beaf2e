"""Retrofit a pretrained Hugging Face causal LM with kNN memory layers, without copying its code.

`patch(model)` registers one attention function, "knnmem", in transformers' public
`AttentionInterface` (plus sdpa's mask builder under the same name: without a mask builder the
function would receive no padding mask), switches the model to it, and attaches a
`MemoryHandle` (`knnmem.handle`) to the model. Unpatched layers run transformers' own sdpa
function unchanged; patched layers run `MemoryHandle.attend` on each forward call:

1. split the segment's rotated q/k into the memory query and un-rotated keys (`positions.py`),
2. retrieve the top-k memories of every query from the layer's `KNNMemory`,
3. attend locally and to memory (and knowledge, if any) through `knnmem.functional`,
4. write the segment's (un-rotated) keys and values into memory, skipping padding tokens.

Batch rows are separate documents. Memory state lives in the handle, one store per patched
layer, so `model.generate()` works unchanged.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Iterable

import torch
from torch import nn

from . import hf
from .files import read_tensors_and_json, save_tensors_and_json
from .handle import (DEFAULT_DISTANCE, DEFAULT_NEIGHBOURS, DEFAULT_QUERY_BLOCK, DEFAULT_TOPK, GATE, SCALE, MemoryHandle,
                     PatchSettings, check_gate_init)
from .memory import default_pinned
from .positions import RotaryPlacement

ATTENTION_NAME = "knnmem"
_PATCH_FILE = "knnmem_patch.safetensors"


def _knnmem_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      position_ids=None, **kwargs):
    """The registered attention function: memory layers through the handle, others through sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    handle: MemoryHandle | None = getattr(module, "_knnmem_handle", None)
    if handle is None or module.layer_idx not in handle.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return handle.attend(module, query, key, value, attention_mask, scaling, position_ids)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _knnmem_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def patch(
    model: nn.Module,
    layers: Iterable[int] | None = None,
    topk: int = DEFAULT_TOPK,
    max_memories: int = 65536,
    mode: str = "joint",
    logits: str = "raw",
    position: str = "constant",
    distance: int = DEFAULT_DISTANCE,
    memory_backend: str = "auto",
    gate_init: float = 0.0,
    pinned: int | None = None,
    heads: dict[int, list[int]] | Iterable[tuple[int, int]] | None = None,
    memory_bias: float = 0.0,
    neighbours: int = DEFAULT_NEIGHBOURS,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> MemoryHandle:
    """Turn attention layers of a transformers causal LM (GPT-2, GPT-NeoX/Pythia, Llama family)
    into kNN memory layers. Returns the `MemoryHandle` (also at `model.knnmem`).

    Args:
        layers: indices of the layers to patch; None = all layers (the measured best for a
            training-free retrofit).
        topk: memories retrieved per query and head. max_memories: capacity per (row, KV head).
        mode: "joint" (one softmax over memory and local keys: training-free) or "gate".
        logits: "raw" (the model's own q.k scale: training-free) or "normalized" (cosine times a
            learned per-head scale, the paper's form; needs fine-tuning).
        position: where memory keys sit for rotary models: "constant", "start" or "none"
            (`knnmem.positions`). distance: the distance of the "constant" policy.
        memory_backend: search backend of the stores ("auto", "exact", "ivf", ...).
        gate_init: initial gate logit of mode="gate" (0 = sigmoid 0.5, as in the paper's code).
        pinned: the first `pinned` tokens of each document stay in memory when it overflows (the
            model's attention sinks: without them a bounded memory is worse than none, see the
            README). None: 64, or max_memories // 2 if that is smaller.
        heads: the query heads that read memory, as {layer: [heads]} or (layer, head) pairs
            (e.g. a calibration's choice, `knnmem.calibrate`); None = every head of `layers`. The
            patched layers are then those named here; heads without memory compute exactly what
            the unpatched head computes, and their KV heads are neither stored nor searched
            unless a memory head shares them.
        memory_bias: log-weight added to every memory's logit in the joint softmax (0: none;
            negative: memory must match clearly better than the local context to take attention).
        neighbours: stored tokens read on each side of every retrieved one, in document order
            (0: the hits alone; n: up to topk * (2n + 1) memories per query, each once).
        query_block: consecutive query positions that share one search, by the sum of their
            queries (InfLLM's relevance); 1: each query searches alone. The search costs 1/block.
    """
    hf.check_supported(model, "knnmem.patch")
    if getattr(model, "knnmem", None) is not None:
        raise ValueError("this model is already patched: call knnmem.unpatch(model) first")
    modules = hf.attention_modules(model)
    head_pairs = _head_pairs(heads, len(modules), model.config.num_attention_heads)
    if head_pairs is not None:
        named = sorted({layer for layer, _ in head_pairs})
        if layers is not None and sorted(set(layers)) != named:
            raise ValueError(f"layers {sorted(set(layers))} and the layers of heads {named} disagree: give one of them")
        layers = named
    settings = PatchSettings(
        layers=_layer_list(layers, len(modules)), heads=head_pairs, topk=topk, max_memories=max_memories, mode=mode, logits=logits,
        position=position, distance=distance, memory_backend=memory_backend, memory_bias=memory_bias,
        neighbours=neighbours, query_block=query_block,
        pinned=default_pinned(max_memories) if pinned is None else pinned)
    gate_init = check_gate_init(gate_init)
    rotary = hf.rotary_embedding(model)
    placement = RotaryPlacement(rotary, position, distance) if rotary is not None else None
    heads, kv_heads, head_dim = hf.head_shape(model)
    handle = MemoryHandle(model, settings, placement, model.config._attn_implementation, kv_heads, head_dim)
    for module in modules:
        if module.layer_idx in settings.layers:
            param = next(module.parameters())
            module.register_parameter(GATE, nn.Parameter(torch.full((heads,), gate_init, device=param.device)))
            module.register_parameter(SCALE, nn.Parameter(torch.full((heads,), head_dim**0.5, device=param.device)))
        module._knnmem_handle = handle
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    model.knnmem = handle
    return handle


def _layer_list(layers: Iterable[int] | None, n_layers: int) -> tuple[int, ...]:
    """`patch`'s layers: None = all layers (the measured best for a training-free retrofit: the
    paper's single trained layer sits at 75% depth, but without training memory in every layer
    gave the lowest perplexity; see the README), else sorted unique indices in [0, n_layers)."""
    if layers is None:
        return tuple(range(n_layers))
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad or not layers:
        raise ValueError(f"layers must be a non-empty list of layer indices in [0, {n_layers}), got {layers}")
    return tuple(sorted(set(layers)))


def _head_pairs(heads, n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...] | None:
    """`patch`'s heads as sorted unique (layer, query head) pairs, each checked against the model."""
    if heads is None:
        return None
    if isinstance(heads, dict):
        items = [(layer, head) for layer, group in heads.items() for head in
                 (group if isinstance(group, (list, tuple)) else [group])]
    elif isinstance(heads, (list, tuple)):
        items = [tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in heads]
    else:
        raise TypeError(f"heads must be a dict {{layer: [heads]}} or a list of (layer, head) pairs, got "
                        f"{type(heads).__name__}")
    bad = [pair for pair in items if not (isinstance(pair, tuple) and len(pair) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in pair) and 0 <= pair[0] < n_layers
        and 0 <= pair[1] < n_heads)]
    if bad or not items:
        raise ValueError(f"heads must be a non-empty set of (layer in [0, {n_layers}), query head in [0, {n_heads})) "
                         f"pairs, got {bad[:4] or items}")
    return tuple(sorted(set(items)))


def unpatch(model: nn.Module) -> None:
    """Restore the model exactly as it was before `patch` (parameters, attention function)."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is None:
        raise ValueError("this model is not patched by knnmem")
    for module in hf.attention_modules(model):
        for name in (GATE, SCALE):
            if name in module._parameters:
                del module._parameters[name]
        del module._knnmem_handle
    model.set_attn_implementation(handle.previous_attn_implementation)
    del model.knnmem


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that patching added (gates and memory scales), e.g. for fine-tuning."""
    return [p for m in hf.attention_modules(model) for n, p in m.named_parameters(recurse=False)
            if n in (GATE, SCALE)]


def save_patch(model: nn.Module, directory: str | os.PathLike) -> None:
    """Save what `patch` added to `model` (its settings, and the gates and memory scales, e.g. after
    fine-tuning) to `directory`/knnmem_patch.safetensors, beside `model.save_pretrained(directory)`.
    `load_patch` restores it onto a freshly loaded model."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is None:
        raise ValueError("this model is not patched by knnmem")
    path, tensors = os.path.join(directory, _PATCH_FILE), patch_parameters(model, handle)
    _check_patch_tensors(path, tensors)
    os.makedirs(directory, exist_ok=True)
    save_tensors_and_json(path, tensors, "knnmem_patch", handle.settings)


def patch_parameters(model: nn.Module, handle: MemoryHandle) -> dict[str, nn.Parameter]:
    """The gates and memory scales of the patched layers, by their saved names."""
    return {f"layer.{m.layer_idx}.{name}": getattr(m, name)
            for m in hf.attention_modules(model) if m.layer_idx in handle.layers for name in (GATE, SCALE)}


def patch_with_settings(model: nn.Module, settings: object, path: str) -> MemoryHandle:
    """`patch(model, **settings)` for settings read from the file at `path` (`MemoryHandle.settings`),
    after checking they are keyword arguments of `patch`."""
    allowed = set(inspect.signature(patch).parameters) - {"model", "gate_init"}
    if not isinstance(settings, dict) or not set(settings) <= allowed:
        raise ValueError(f"{path}: settings must be keyword arguments of knnmem.patch, got {settings!r}")
    return patch(model, **settings)


def saved_settings(directory: str | os.PathLike) -> dict:
    """The patch settings saved by `save_patch` in `directory` (ValueError if there are none)."""
    path = os.path.join(directory, _PATCH_FILE)
    _, settings = read_tensors_and_json(path, "knnmem_patch", "knnmem patch file")
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: no knnmem_patch settings")
    return settings


def _check_patch_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Gates may be +-inf (a closed or fully open gate), never NaN; memory scales must be finite."""
    for name, x in tensors.items():
        if not x.is_floating_point() or bool(x.isnan().any()) or (name.endswith(SCALE) and not bool(x.isfinite().all())):
            raise ValueError(f"{path}: {name} must hold {'finite numbers' if name.endswith(SCALE) else 'numbers'} "
                             f"(no NaN), got {x.dtype} {x.flatten()[:4].tolist()}")


def load_patch(model: nn.Module, directory: str | os.PathLike) -> MemoryHandle:
    """Patch `model` with the settings saved by `save_patch` and restore its trained gates and
    memory scales. Returns the handle (memories start empty)."""
    path = os.path.join(directory, _PATCH_FILE)
    tensors, settings = read_tensors_and_json(path, "knnmem_patch", "knnmem patch file")
    _check_patch_tensors(path, tensors)
    handle = patch_with_settings(model, settings, path)
    expected = patch_parameters(model, handle)
    if set(tensors) != set(expected) or any(tensors[k].shape != p.shape for k, p in expected.items()):
        unpatch(model)
        raise ValueError(f"{path}: parameters {sorted(tensors)} do not match this model's patched layers")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])
    return handle
