"""The training loop: long documents read segment by segment with memory, as the eval reads them.

Documents are equal-length token tensors (`knnmem.corpus.pieces` cuts long texts into them).
A batch puts `batch_size` documents side by side, one per row, with fresh memory; its windows
(`knnmem.stream.windows`) are read in order, each one forward and backward pass whose loss is
the mean cross-entropy of the window's scored tokens. Memory and XL caches are written detached,
so gradients stop at the window, as in the paper. The optimizer steps every `accumulate`
windows (AdamW, linear warm-up then cosine decay, gradient clipping), the memory is cleared
after each batch, and at batch ends the loop validates on held-out documents and saves a
checkpoint of the trainable parameters only, from which `train(..., resume=True)` continues
to exactly the same losses.

Under `torchrun`, each process reads its own batches and gradients are averaged every step.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .._checks import check_int, check_number
from ..files import atomic_write, check_regular_file
from ..stream import forward_window, reset_memory, windows
from .trainable import (TRAINED_FILE, check_trained_fits, is_memory_parameter, read_trained, restore_parameters,
                        save_trained)

STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.json"
# Settings a resumed run must share with the run it continues (they decide data and schedule).
_RESUME_FIXED = ("steps", "lr", "lr_memory", "warmup", "min_lr_ratio", "weight_decay", "accumulate",
                 "batch_size", "segment", "context", "seed", "refresh_cache")


@dataclass
class TrainSettings:
    """steps: optimizer steps. lr: learning rate of the weights (LoRA, projections, or all of a
    model trained from scratch); lr_memory: of gates and memory scales (None: lr). warmup: steps
    of linear warm-up, then cosine decay to lr * min_lr_ratio. clip: max gradient norm (0: off).
    accumulate: windows per optimizer step. batch_size: documents read side by side.
    segment: scored tokens per window; context: local-context tokens before it (`knnmem.stream`).
    validate_every / save_every: steps between validations / checkpoints (at batch ends; 0: only
    at the end). refresh_cache: before each window, recompute the XL caches of a model that keeps
    them (`MemorizingTransformer.refresh_cache`) with the current weights: one more forward
    without gradient per window, and no stale cache (see the README's from-scratch section)."""

    steps: int = 300
    lr: float = 1e-4
    lr_memory: float | None = 1e-2
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    accumulate: int = 1
    batch_size: int = 1
    segment: int = 512
    context: int = 0
    validate_every: int = 100
    save_every: int = 100
    seed: int = 0
    refresh_cache: bool = False

    def validate(self) -> None:
        for name in ("steps", "accumulate", "batch_size", "segment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup", "context", "validate_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        check_int("seed", self.seed, 0, 2 ** 32 - 1)
        if not isinstance(self.refresh_cache, bool):
            raise ValueError(f"refresh_cache must be True or False, got {self.refresh_cache!r}")
        for name in ("lr", "lr_memory"):
            value = getattr(self, name)
            if not (value is None and name == "lr_memory") and not check_number(name, value) > 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= check_number("min_lr_ratio", self.min_lr_ratio) <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("weight_decay", "clip"):
            if check_number(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")


def _stack(documents: list[torch.Tensor], name: str) -> torch.Tensor:
    if not documents:
        raise ValueError(f"{name}: no documents")
    lengths = {d.numel() for d in documents}
    if len(lengths) != 1 or any(d.ndim != 1 or d.dtype != torch.long for d in documents):
        raise ValueError(f"{name} must be 1-D int64 token tensors of one length (use pieces()), got lengths {sorted(lengths)[:5]}")
    return torch.stack(documents)


def schedule(settings: TrainSettings) -> Callable[[int], float]:
    """Learning-rate factor of step s: linear warm-up, then cosine decay to min_lr_ratio."""
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (see knnmem.train.prepare)")
    memory = [p for n, p in params if is_memory_parameter(n)]
    weights = [p for n, p in params if not is_memory_parameter(n)]
    groups = [{"params": weights, "lr": settings.lr}] if weights else []
    if memory:
        groups.append({"params": memory, "lr": settings.lr_memory or settings.lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _window_loss(model, batch: torch.Tensor, w, reduction: str = "mean") -> tuple[torch.Tensor, int]:
    """Cross-entropy of the tokens window `w` scores (their mean, or (B, n) with reduction
    "none"), and how many there are."""
    targets = batch[:, w.a + 1:w.b + 1].to(model.device)
    logits = forward_window(model, batch, w)[:, :targets.shape[1]]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return (loss.view(targets.shape) if reduction == "none" else loss), targets.numel()


@torch.no_grad()
def token_losses(model, documents: list[torch.Tensor], segment: int, context: int = 0,
                 batch_size: int = 1) -> torch.Tensor:
    """(n_documents, n_tokens - 1) float32: the cross-entropy of every token but the first
    (column j scores token j + 1), each document read window by window from fresh memory."""
    docs = _stack(documents, "documents")
    was_training = model.training
    model.eval()
    rows = []
    for i in range(0, docs.shape[0], batch_size):
        batch = docs[i:i + batch_size]
        reset_memory(model)
        rows.append(torch.cat([_window_loss(model, batch, w, "none")[0].cpu()
                               for w in windows(batch.shape[1], segment, context)], dim=1))
    reset_memory(model)
    model.train(was_training)
    return torch.cat(rows)


def perplexity(model, documents: list[torch.Tensor], segment: int, context: int = 0, batch_size: int = 1) -> float:
    """Perplexity of equal-length `documents`, each read from fresh memory (split across
    processes under torchrun)."""
    world, rank = _world()
    docs = _stack(documents, "documents")
    mine = docs[rank::world]
    losses = token_losses(model, list(mine), segment, context, batch_size) if len(mine) else torch.zeros(0, 1)
    sums = torch.tensor([losses.double().sum().item(), losses.numel()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    return math.exp(sums[0].item() / sums[1].item())


def _save(model, output: str, state: dict, info: dict) -> None:
    """The checkpoint: trained parameters, then trainer state, then log, each atomically. Both
    checkpoint files carry the step, so that a crash between them is caught by resume."""
    os.makedirs(output, exist_ok=True)
    save_trained(model, os.path.join(output, TRAINED_FILE), {**info, "step": state["step"]})
    atomic_write(os.path.join(output, STATE_FILE), lambda tmp: torch.save(state, tmp))
    log = {k: state[k] for k in ("step", "settings", "history", "validation", "seconds", "tokens")}
    atomic_write(os.path.join(output, LOG_FILE), lambda tmp: _write_json(tmp, log))


_STATE_FIELDS = {"step": int, "batch": int, "history": list, "validation": list, "seconds": float, "tokens": int,
                 "settings": dict, "data": list, "optimizer": dict, "scheduler": dict}


def _read_state(path: str) -> dict:
    """The trainer state saved by `_save` (tensors and plain data only: nothing runs from it);
    ValueError naming the file if it is damaged or not one."""
    check_regular_file(path, "trainer state")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for damaged files
        raise ValueError(f"{path} is not a readable trainer state ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a trainer state (a {type(state).__name__})")
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise ValueError(f"{path}: field {name!r} must be a {kind.__name__}, got {type(state.get(name)).__name__}")
    return state


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def train(model: nn.Module, train_documents: list[torch.Tensor], settings: TrainSettings,
          validation_documents: list[torch.Tensor] | None = None, output: str | None = None,
          resume: bool = False, info: dict | None = None, progress: bool = True) -> dict:
    """Train `model` (its parameters with requires_grad) on equal-length documents.

    Returns the log: losses per step (`history`), validation perplexities (`validation`), tokens
    and seconds. With `output`, checkpoints go there (trainable parameters with `info` as
    metadata, optimizer state, log); `resume=True` continues from the checkpoint in `output`.
    """
    settings.validate()
    docs = _stack(train_documents, "train_documents")
    if validation_documents is not None:
        _stack(validation_documents, "validation_documents")
    if settings.refresh_cache and not hasattr(model, "refresh_cache"):
        raise ValueError(f"refresh_cache=True needs a model with XL caches of its own (MemorizingTransformer), "
                         f"not a {type(model).__name__}")
    if docs.shape[1] < settings.segment + 1:
        raise ValueError(f"documents of {docs.shape[1]} tokens are shorter than one segment ({settings.segment}) + 1")
    world, rank = _world()
    batches_per_round = docs.shape[0] // settings.batch_size // world
    if batches_per_round == 0:
        raise ValueError(f"{docs.shape[0]} documents cannot fill batch_size={settings.batch_size} "
                         f"in each of {world} processes")
    device = model.device
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    data = [docs.shape[0], docs.shape[1], world]  # documents, their length, processes: decide the order
    state = {"step": 0, "batch": 0, "history": [], "validation": [], "seconds": 0.0, "tokens": 0,
             "settings": asdict(settings), "data": data}
    if not resume and output is not None and os.path.lexists(os.path.join(output, STATE_FILE)):
        raise ValueError(f"output {output!r} already holds a checkpoint: resume=True continues it (nothing is "
                         "overwritten)")
    if resume:
        if output is None or not os.path.exists(os.path.join(output, STATE_FILE)):
            raise ValueError(f"resume=True needs a checkpoint in output ({output!r} has no {STATE_FILE})")
        state = _read_state(os.path.join(output, STATE_FILE))
        defaults = TrainSettings()  # a checkpoint older than a setting ran with its default
        changed = [k for k in _RESUME_FIXED if state["settings"].get(k, getattr(defaults, k)) != getattr(settings, k)]
        if changed:
            raise ValueError(f"cannot resume with different {changed}: the checkpoint has "
                             f"{ {k: state['settings'].get(k) for k in changed} }")
        if state.get("data") != data:
            raise ValueError(f"cannot resume on other data: the checkpoint read {state.get('data')} "
                             f"(documents, tokens each, processes), this run has {data}")
        tensors, trained_info = read_trained(os.path.join(output, TRAINED_FILE))
        handle = getattr(model, "knnmem", None)
        if handle is not None and trained_info.get("patch") != handle.settings:
            raise ValueError(f"cannot resume with other patch settings: the checkpoint has {trained_info.get('patch')}, "
                             f"this model is patched with {handle.settings}")
        if handle is not None:
            check_trained_fits(model, trained_info, os.path.join(output, TRAINED_FILE))
        if trained_info.get("step") != state["step"]:
            raise ValueError(f"{output}: the trained parameters are of step {trained_info.get('step')}, the trainer "
                             f"state of step {state['step']} (a save was interrupted): cannot resume from it")
        restore_parameters(model, tensors, os.path.join(output, TRAINED_FILE))
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    spans = windows(docs.shape[1], settings.segment, settings.context)
    bar = tqdm(total=settings.steps, initial=state["step"], desc="train", unit="step", disable=not progress or rank)
    next_validation = _next(state["step"], settings.validate_every)
    next_save = _next(state["step"], settings.save_every)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    while state["step"] < settings.steps:
        epoch, index = divmod(state["batch"], batches_per_round)
        order = torch.randperm(docs.shape[0], generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch))
        first = (index * world + rank) * settings.batch_size
        batch = docs[order[first:first + settings.batch_size]]
        start = time.perf_counter()
        reset_memory(model)
        pending, losses = 0, []
        for i, w in enumerate(spans):
            with autocast:
                if settings.refresh_cache and i:
                    model.refresh_cache(batch[:, spans[i - 1].a:spans[i - 1].b].to(device))
                loss, n = _window_loss(model, batch, w)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss is {loss.item()} at step {state['step'] + 1}: stopped "
                                         "before the update (the last checkpoint, if any, is kept)")
            if loss.requires_grad:  # not when nothing trained reached it (joint mode, memory still empty)
                (loss / settings.accumulate).backward()
            pending, state["tokens"] = pending + 1, state["tokens"] + n * world
            losses.append(loss.item())
            if pending == settings.accumulate or i == len(spans) - 1:
                _step(params, optimizer, scheduler, settings, pending, world)
                step_loss = sum(losses) / len(losses)
                if world > 1:
                    step_loss = _mean_over_processes(step_loss)
                state["history"].append(step_loss)
                state["step"] += 1
                pending, losses = 0, []
                bar.update()
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                if state["step"] == settings.steps:
                    break
        reset_memory(model)
        state["batch"] += 1
        state["seconds"] += time.perf_counter() - start
        done = state["step"] == settings.steps
        if validation_documents and (done or state["step"] >= next_validation):
            ppl = perplexity(model, validation_documents, settings.segment, settings.context, settings.batch_size)
            state["validation"].append({"step": state["step"], "ppl": ppl})
            bar.write(f"step {state['step']}: validation ppl {ppl:.3f}")
            next_validation = _next(state["step"], settings.validate_every)
        if output is not None and (done or state["step"] >= next_save):
            if rank == 0:
                _save(model, output, {**state, "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict()}, info or {})
            next_save = _next(state["step"], settings.save_every)
    bar.close()
    return state


def _next(step: int, every: int) -> int:
    return (step // every + 1) * every if every else math.inf


def _mean_over_processes(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _step(params, optimizer, scheduler, settings: TrainSettings, pending: int, world: int) -> None:
    """One optimizer step over the gradients of `pending` windows (a short group at a batch end
    is rescaled to a mean), averaged over processes, clipped."""
    for p in params:
        if p.grad is None:
            continue
        if pending != settings.accumulate:
            p.grad.mul_(settings.accumulate / pending)
        if world > 1:
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    norm = torch.nn.utils.clip_grad_norm_(params, settings.clip or math.inf)  # max_norm inf: measures only
    if not math.isfinite(norm.item()):
        raise FloatingPointError(f"gradient norm is {norm.item()}: stopped before the update (the last "
                                 "checkpoint, if any, is kept)")
    optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise FloatingPointError("an update made trained parameters non-finite (learning rate too high?): stopped "
                                 "(the last checkpoint, if any, is kept)")
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
