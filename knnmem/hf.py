"""What knnmem knows about transformers model families, in one place.

A family is supported when its attention goes through transformers' `AttentionInterface` and
its positions are rotary (applied to q/k before the attention function) or absolute (added to
the residual stream). Supporting another family means extending this file only.
"""
from __future__ import annotations

from torch import nn

# Rotary families whose rotation is Llama's (rotate_half over halves, which `knnmem.positions`
# undoes) and whose attention has no logit soft-capping, and absolute-position families (GPT-2, OPT).
SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2",
                         "granite", "opt")
FAMILIES = "GPT-2, GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Qwen3, Gemma (1), Phi-3, OLMo, OLMo 2, Granite, OPT"
# Families left out on purpose, and why: memory layers would read them wrongly, silently.
REFUSED_WHY = {
    "gemma2": "its attention soft-caps the logits (attn_logit_softcapping), which memory layers do not apply",
    "gemma3": "its attention soft-caps the logits and mixes sliding-window layers with different rotary bases",
    "cohere": "its rotary embedding rotates interleaved pairs, not halves: stored keys would be un-rotated wrongly",
    "helium": "its rotary embedding rotates interleaved pairs, not halves: stored keys would be un-rotated wrongly",
    "gptj": "its rotary embedding rotates interleaved pairs, not halves: stored keys would be un-rotated wrongly",
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def check_supported(model: nn.Module, what: str) -> str:
    """The model's type, or TypeError naming `what` (the caller) if knnmem does not support it."""
    kind = model_type(model)
    if kind not in SUPPORTED_MODEL_TYPES:
        why = f": not supported because {REFUSED_WHY[kind]}" if kind in REFUSED_WHY else ""
        raise TypeError(f"{what} supports transformers models of types {SUPPORTED_MODEL_TYPES} ({FAMILIES}), "
                        f"got {type(model).__name__} (model_type={kind!r}){why}")
    return kind


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules, in layer order (each has `layer_idx` and `scaling`)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (one per hidden layer)."""
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TypeError(f"found no list of {n} decoder blocks in {type(model).__name__}")


def head_shape(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of the model's attention."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(attention_modules(model)[0], "head_dim", config.hidden_size // heads)  # GPT-NeoX has none
    return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    """The model's rotary embedding module, called as rotary(x, position_ids) -> (cos, sin);
    None for absolute positions (GPT-2)."""
    return getattr(model.base_model, "rotary_emb", None)


def projection_names(model: nn.Module, layers: list[int]) -> list[str]:
    """Full names of the linear projections (q/k/v/out; GPT-2's Conv1D too) inside the attention
    modules of `layers`."""
    from transformers.pytorch_utils import Conv1D

    modules = {id(m) for m in attention_modules(model) if m.layer_idx in layers}
    names = []
    for name, module in model.named_modules():
        if id(module) in modules:
            names += [f"{name}.{child}" for child, sub in module.named_children() if isinstance(sub, (nn.Linear, Conv1D))]
    return names


def native_context(model: nn.Module) -> int | None:
    """The positions the model was trained on (its config's max_position_embeddings), if known."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def stores_weights_transposed(model: nn.Module) -> bool:
    """GPT-2's Conv1D keeps (in, out) weights: LoRA needs fan_in_fan_out there."""
    return model_type(model) == "gpt2"


def model_fingerprint(model: nn.Module) -> str:
    """The model a saved retrofit or knowledge belongs to: type, shape and a checksum of the input
    embeddings (frozen by every retrofit; another model, or another size, gives another string)."""
    config, weight = model.config, model.get_input_embeddings().weight
    checksum = float(weight.detach().flatten()[:65536].double().sum())
    layers, heads, kv_heads = config.num_hidden_layers, *head_shape(model)[:2]
    return f"{config.model_type}/{layers}x{config.hidden_size}/heads={heads},{kv_heads}/{checksum:.9e}"
