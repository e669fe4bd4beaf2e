"""`ResidualMemory`: a parametric memory, a small MLP added to one block's residual stream.

    h <- h + gate * W_up(GELU(W_down(LayerNorm(h))))      (d -> bottleneck -> d, one scalar gate)

It is the baseline the knowledge memory is compared with (`knnmem eval --task recall`): the base
model stays frozen and only the adapter is trained, on the documents it should memorise
(`knnmem.train.train_adapter`). The gate starts at 0, so an attached,
untrained adapter leaves the model's outputs unchanged; `detach` restores the model bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_number, check_positive_int
from . import hf

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
        self.gate = nn.Parameter(torch.tensor(check_number("gate_init", gate_init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(nn.functional.gelu(self.down(self.norm(h.to(self.down.weight.dtype)))))
        return h + (self.gate * delta).to(h.dtype)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a GPT-2, GPT-NeoX/Pythia or Llama-family model of transformers."""
    hf.check_supported(model, "ResidualMemory")
    return hf.decoder_blocks(model)


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
