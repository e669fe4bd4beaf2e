"""What a fine-tuning run trains, and the file that holds it.

A retrofit (`knnmem.patch`) is fine-tuned with everything else frozen:

- `memory`: the gates and memory scales that `patch` added (a few numbers per head).
- `attention`: those, and the query/key/value/output projections of the memory layers.
- `lora`: those, and LoRA adapters (through `peft`) on the memory layers' projections.

The trained parameters, and what is needed to rebuild them (the `patch` settings, the choice
above, the LoRA shape), are saved as one safetensors file; `load_trained` puts them back onto a
freshly loaded model in one call.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import hf
from .._checks import check_choice, check_finite_tensors, check_int, check_number, check_positive_int
from ..files import read_tensors_and_json, save_tensors_and_json
from ..handle import MemoryHandle
from ..patch import patch_with_settings, unpatch

TRAINABLE = ("memory", "attention", "lora")
TRAINED_FILE = "knnmem_trained.safetensors"
MEMORY_PARAMETER_NAMES = ("knn_gate", "knn_memory_scale", "gate", "memory_scale")


def is_memory_parameter(name: str) -> bool:
    """Gates and memory scales (of `patch` or `KNNAttention`), which train at their own rate."""
    return name.rsplit(".", 1)[-1] in MEMORY_PARAMETER_NAMES


def check_something_trains(train: str, mode: str, logits: str) -> None:
    """ValueError unless `train` reaches the output of a retrofit in `mode` with `logits`: with
    joint + raw logits no gate is used and the memory scale multiplies only normalised logits."""
    check_choice("train", train, TRAINABLE)
    if train == "memory" and mode == "joint" and logits == "raw":
        raise ValueError("train 'memory' has nothing to train with mode 'joint' and logits 'raw' (gates and memory "
                         "scales: neither affects the output): use mode 'gate' or logits 'normalized', or train "
                         "'attention' or 'lora'")


def read_retrofit(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """`read_trained` for a fine-tuned retrofit (what `knnmem train` writes); ValueError otherwise."""
    tensors, info = read_trained(path)
    if info.get("train") not in TRAINABLE:
        raise ValueError(f"{path}: not a fine-tuned retrofit (train {info.get('train')!r}, expected one of {TRAINABLE})")
    return tensors, info


def prepare(model: nn.Module, train: str = "memory", lora_rank: int = 8, lora_alpha: float = 16.0) -> dict[str, nn.Parameter]:
    """Freeze a patched model except what `train` names (adding LoRA adapters for "lora").
    Returns the trainable parameters by name."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is None:
        raise ValueError("prepare needs a model patched by knnmem.patch (or loaded by load_trained)")
    check_something_trains(train, handle.mode, handle.logits)
    targets = hf.projection_names(model, handle.layers)
    if train == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        check_positive_int("lora_rank", lora_rank)
        fan_in_fan_out = hf.stores_weights_transposed(model)
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets,
                                           fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0), model)
    handle.training = {"train": train, "lora_rank": lora_rank, "lora_alpha": lora_alpha}
    for name, param in model.named_parameters():
        if is_memory_parameter(name):
            param.requires_grad_(True)
        elif train == "attention":
            param.requires_grad_(any(name.startswith(t + ".") for t in targets))
        else:
            param.requires_grad_(train == "lora" and "lora_" in name)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trained(model: nn.Module, path: str, info: dict) -> None:
    """Write the trainable parameters of `model` and `info` (JSON metadata) to `path`, atomically.
    For a retrofit, the metadata also holds what `load_trained` needs: the patch settings and the
    choice made by `prepare`."""
    handle: MemoryHandle | None = getattr(model, "knnmem", None)
    if handle is not None:
        info = {**info, "patch": handle.settings, **(handle.training or {}),
                "model_fingerprint": hf.model_fingerprint(model)}
    params = trained_parameters(model)
    check_finite_tensors(f"save_trained({path!r})", params)
    save_tensors_and_json(path, params, "knnmem_trained", info)


def read_trained(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a file written by `save_trained`; ValueError if it is not one."""
    tensors, info = read_tensors_and_json(path, "knnmem_trained", "knnmem checkpoint")
    if not isinstance(info, dict):
        raise ValueError(f"{path}: no knnmem_trained metadata")
    return tensors, info


def restore_parameters(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Copy `tensors` into the trainable parameters of `model` (cast to their dtypes): names and
    shapes must match exactly, every tensor must be floating point and finite; all is checked
    before anything is copied."""
    params = trained_parameters(model)
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{path} does not match this model's trainable parameters "
                         f"(missing: {missing[:4]}, unexpected: {extra[:4]})")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"the model's is {tuple(param.shape)}")
    check_finite_tensors(path, tensors)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def check_trained_fits(model: nn.Module, info: dict, path: str) -> None:
    """ValueError unless the checkpoint `info` (of `read_trained`) was trained on this model (its
    fingerprint, where the file records one) with a LoRA shape that fits it."""
    saved = info.get("model_fingerprint")
    if saved is not None and saved != hf.model_fingerprint(model):
        raise ValueError(f"{path} was trained on another model ({saved}), not this one "
                         f"({hf.model_fingerprint(model)})")
    check_int(f"{path}: lora_rank", info.get("lora_rank", 8), 1, model.config.hidden_size)
    check_number(f"{path}: lora_alpha", info.get("lora_alpha", 16.0))


def load_trained(model: nn.Module, directory: str | os.PathLike) -> MemoryHandle:
    """Put a fine-tuned retrofit saved by `knnmem train` (its `directory`) onto a freshly loaded,
    unpatched `model`: patch it with the saved settings, add the saved LoRA adapters, and load
    the trained parameters. Returns the memory handle; the model stays frozen but for those.

        model = AutoModelForCausalLM.from_pretrained(...)
        handle = knnmem.load_trained(model, "runs/train")
    """
    path = os.path.join(os.fspath(directory), TRAINED_FILE)
    tensors, info = read_retrofit(path)
    check_trained_fits(model, info, path)
    check_finite_tensors(path, tensors)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    handle = patch_with_settings(model, info.get("patch"), path)
    try:
        prepare(model, info["train"], info.get("lora_rank", 8), info.get("lora_alpha", 16.0))
        restore_parameters(model, tensors, path)
    except Exception:  # leave the model as it was: no LoRA layers, no patch, its own requires_grad
        _remove_lora(model)
        unpatch(model)
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, p.requires_grad))
        raise
    return handle


def _remove_lora(model: nn.Module) -> None:
    """Put back the base layer of every LoRA layer that `prepare` injected."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and any("lora_" in child for child, _ in module.named_children()):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, base)
