"""`ResidualMemory`: a parametric memory, a small MLP added to one block's residual stream.

    h <- h + gate * W_up(GELU(W_down(LayerNorm(h))))      (d -> bottleneck -> d, one scalar gate)

It is the baseline the knowledge memory is compared with (`knnmem eval --task recall`): the base
model stays frozen and only the adapter is trained, on the documents it should memorise
(`train_adapter`, through the `knnmem.train` loop). The gate starts at 0, so an attached,
untrained adapter leaves the model's outputs unchanged; `detach` restores the model bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_positive_int
from .patch import SUPPORTED_MODEL_TYPES
from .train.loop import TrainSettings, pieces, train

_ATTRIBUTE = "residual_memory"


class ResidualMemory(nn.Module):
    """h (..., d) -> h + gate * MLP(LayerNorm(h)). bottleneck: hidden width of the MLP."""

    def __init__(self, d_model: int, bottleneck: int = 128, gate_init: float = 0.0) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("bottleneck", bottleneck)
        self.norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(nn.functional.gelu(self.down(self.norm(h.to(self.down.weight.dtype)))))
        return h + (self.gate * delta).to(h.dtype)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a GPT-2, GPT-NeoX/Pythia or Llama-family model of transformers."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"ResidualMemory attaches to transformers models of types {SUPPORTED_MODEL_TYPES}, "
                        f"got {type(model).__name__} (model_type={model_type!r})")
    n = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TypeError(f"found no list of {n} decoder blocks in {type(model).__name__}")


def default_layer(n_layers: int) -> int:
    """The block at 75% depth (the source experiment's 70-80%)."""
    return (3 * n_layers) // 4


def _add_to_output(block: nn.Module, inputs, output):
    adapter = getattr(block, _ATTRIBUTE)
    if isinstance(output, tuple):  # blocks that return (hidden states, ...)
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def attach(model: nn.Module, layer: int | None = None, bottleneck: int = 128,
           gate_init: float = 0.0) -> ResidualMemory:
    """Add a `ResidualMemory` to the output of decoder block `layer` (default: 75% depth).
    The adapter lives at `block.residual_memory` (in the model's parameters and state dict) on the
    model's device and dtype. Returns it."""
    blocks = decoder_blocks(model)
    layer = default_layer(len(blocks)) if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be a block index in [0, {len(blocks)}), got {layer!r}")
    if any(hasattr(block, _ATTRIBUTE) for block in blocks):
        raise ValueError("this model already has a ResidualMemory: detach(model) first")
    param = next(model.parameters())
    adapter = ResidualMemory(model.config.hidden_size, bottleneck, gate_init).to(param.device)
    block = blocks[layer]
    block.add_module(_ATTRIBUTE, adapter)
    block._residual_memory_hook = block.register_forward_hook(_add_to_output)
    return adapter


def attached(model: nn.Module) -> ResidualMemory | None:
    """The model's ResidualMemory, if one is attached."""
    return next((getattr(b, _ATTRIBUTE) for b in decoder_blocks(model) if hasattr(b, _ATTRIBUTE)), None)


def detach(model: nn.Module) -> ResidualMemory:
    """Remove the attached ResidualMemory (returned, e.g. to attach again later): the model is
    exactly as before `attach`."""
    for block in decoder_blocks(model):
        if hasattr(block, _ATTRIBUTE):
            block._residual_memory_hook.remove()
            del block._residual_memory_hook
            adapter = getattr(block, _ATTRIBUTE)
            delattr(block, _ATTRIBUTE)
            return adapter
    raise ValueError("this model has no ResidualMemory attached")


def train_adapter(model: nn.Module, documents: list[torch.Tensor], settings: TrainSettings,
                  piece_length: int | None = None, progress: bool = True) -> dict:
    """Memorise `documents` (1-D token tensors of any lengths) into the model's attached
    ResidualMemory, with every other parameter frozen, through the `knnmem.train` loop.

    The documents are joined into one token stream and cut into training pieces of `piece_length`
    tokens (default: settings.segment + settings.context + 1; the tail is a last piece ending with
    the stream). Returns the training log. The model's other parameters get back their previous
    requires_grad afterwards.
    """
    adapter = attached(model)
    if adapter is None:
        raise ValueError("train_adapter needs a model with a ResidualMemory attached (knnmem.adapters.attach)")
    if not documents or any(not isinstance(d, torch.Tensor) or d.ndim != 1 for d in documents):
        raise ValueError("documents must be a non-empty list of 1-D token tensors")
    length = piece_length or settings.segment + settings.context + 1
    stream = torch.cat([d.long() for d in documents])
    if stream.numel() < length:
        raise ValueError(f"the documents hold {stream.numel()} tokens, fewer than one piece of {length}")
    chunks = pieces(stream, length)
    if stream.numel() % length:  # the tail, as a last piece that ends with the stream
        chunks.append(stream[-length:])
    own = {id(p) for p in adapter.parameters()}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        return train(model, chunks, settings, progress=progress)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name])
        model.eval()
