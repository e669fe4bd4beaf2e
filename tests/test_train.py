import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import knnmem
from knnmem import MemorizingConfig, MemorizingTransformer
from knnmem.layer import CausalAttention
from knnmem.synthetic import repeated_motifs
from knnmem.train import TrainSettings, load_trained, perplexity, pieces, prepare, token_losses, train
from knnmem.commands.train import main as train_main
from knnmem.train.retrofit import default_layers


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=64, max_position_embeddings=512,
                         initializer_range=0.2)  # logits large enough for a frozen base to be trainable
    return LlamaForCausalLM(config)


def _repeating_documents(count: int, length: int, period: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Documents that repeat a random phrase: what was read before predicts what comes next."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(64, (period,), generator=g).repeat(length // period + 1)[:length] for _ in range(count)]


SMALL = dict(lr=1e-2, lr_memory=1e-1, warmup=2, segment=16, context=16, batch_size=2, validate_every=0, save_every=0)


def test_the_default_training_corpus_holds_none_of_the_eval_documents():
    from knnmem import corpus

    held_out = set(corpus.stdlib_documents(corpus.EVAL_DOCUMENTS).values())
    assert held_out <= set(corpus.default_corpus())  # the largest stdlib files: they would be in it
    training = corpus.training_corpus()
    assert len(training) == 200 and not held_out & set(training)


def test_default_layers_are_a_fifth_at_60_to_80_percent_depth():
    assert default_layers(30) == [18, 19, 20, 21, 22, 23]
    assert default_layers(12) == [7, 8] and default_layers(2) == [1]


def test_prepare_freezes_all_but_what_is_trained():
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate", logits="normalized")
    names = set(prepare(model, "memory"))
    assert names == {"model.layers.1.self_attn.knn_gate", "model.layers.1.self_attn.knn_memory_scale"}
    names = set(prepare(model, "attention"))
    assert {n.rsplit(".", 2)[-2] for n in names} == {"self_attn", "q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(n.startswith("model.layers.1.") for n in names)
    names = set(prepare(model, "lora", lora_rank=2))
    assert any("lora_A" in n for n in names) and all("lora_" in n or "knn_" in n for n in names)
    assert all(n.startswith("model.layers.1.") for n in names)
    with pytest.raises(ValueError, match="train must be one of"):
        prepare(model, "everything")
    with pytest.raises(ValueError, match="needs a model patched"):
        prepare(_llama(), "memory")


def test_training_a_retrofit_lowers_the_loss_and_clears_memory_per_document():
    model = _llama()
    handle = knnmem.patch(model, layers=[1, 2], mode="gate", logits="normalized", max_memories=256)
    prepare(model, "attention")
    seen = []  # stored tokens per row in layer 1 before each window
    model.register_forward_pre_hook(lambda m, args: seen.append(
        handle.memories[1].counts.tolist() if 1 in handle.memories else [0, 0]))
    docs = _repeating_documents(4, 96)
    log = train(model, docs, TrainSettings(steps=30, **SMALL), progress=False)
    assert len(log["history"]) == 30 and log["tokens"] == 30 * 2 * 16 - 5 * 2  # the 6th window of a batch scores 15
    first, last = sum(log["history"][:5]) / 5, sum(log["history"][-5:]) / 5
    assert last < 0.9 * first, (first, last)  # measured 4.44 -> 3.45
    windows_per_batch = 6
    for i, counts in enumerate(seen):
        w = i % windows_per_batch  # window w of its batch stores the tokens before its local context
        assert counts == [max(0, 16 * (w - 1))] * 2, (i, counts)
    assert all(m.counts.tolist() == [0, 0] for m in handle.memories.values())  # cleared after the last batch


@pytest.mark.parametrize("what", ["memory", "attention", "lora"])
def test_checkpoint_loads_onto_a_fresh_model_in_one_call(what, tmp_path):
    model = _llama()
    knnmem.patch(model, layers=[2], mode="gate", logits="normalized", max_memories=128)
    prepare(model, what, lora_rank=2)
    train(model, _repeating_documents(2, 64), TrainSettings(steps=4, **SMALL), output=str(tmp_path), progress=False)
    fresh = _llama()
    handle = load_trained(fresh, tmp_path)
    assert handle.layers == [2] and handle.mode == "gate"
    ids = torch.randint(64, (1, 40))
    model.knnmem.reset()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already patched"):
        load_trained(fresh, tmp_path)


def test_resume_continues_to_exactly_the_same_losses(tmp_path):
    docs = _repeating_documents(6, 64)

    def run(steps_before_interrupt=None, resume=False):
        model = _llama()
        knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
        prepare(model, "lora", lora_rank=2)
        if steps_before_interrupt is not None:
            calls = []

            def interrupt(module, args):
                calls.append(1)
                if len(calls) > steps_before_interrupt:
                    raise KeyboardInterrupt
            model.register_forward_pre_hook(interrupt)
        settings = TrainSettings(steps=12, **{**SMALL, "save_every": 4, "accumulate": 2})
        return train(model, docs, settings, output=str(tmp_path / "run"), resume=resume, info={}, progress=False)

    full = run()["history"]
    (tmp_path / "run" / "trainer_state.pt").unlink()
    with pytest.raises(KeyboardInterrupt):
        run(steps_before_interrupt=4 * 2 * 2 + 3)  # a checkpoint at step 4 (batch end), interrupted mid-batch
    resumed = run(resume=True)
    assert resumed["history"] == full  # the first 4 from the checkpoint, the rest recomputed
    with pytest.raises(ValueError, match="cannot resume with different"):
        model = _llama()
        knnmem.patch(model, layers=[1], mode="gate", logits="normalized", max_memories=128)
        prepare(model, "lora", lora_rank=2)
        train(model, docs, TrainSettings(steps=12, **{**SMALL, "seed": 1}), output=str(tmp_path / "run"), resume=True)
    with pytest.raises(ValueError, match="cannot resume on other data"):
        train(model, docs[:4], TrainSettings(steps=12, **{**SMALL, "save_every": 4, "accumulate": 2}),
              output=str(tmp_path / "run"), resume=True)


def test_bad_training_input_raises():
    model = _llama()
    knnmem.patch(model, layers=[1], mode="gate")
    prepare(model, "memory")
    with pytest.raises(ValueError, match="one length"):
        train(model, [torch.zeros(40, dtype=torch.long), torch.zeros(41, dtype=torch.long)], TrainSettings())
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train(model, _repeating_documents(2, 64), TrainSettings(steps=0))
    with pytest.raises(ValueError, match="cannot fill batch_size=4"):
        train(model, _repeating_documents(2, 64), TrainSettings(batch_size=4, segment=16))
    with pytest.raises(ValueError, match="shorter than one segment"):
        train(model, _repeating_documents(2, 64), TrainSettings(segment=64))
    with pytest.raises(ValueError, match="resume=True needs a checkpoint"):
        train(model, _repeating_documents(2, 64), TrainSettings(segment=16), resume=True)
    assert [p.numel() for p in pieces(torch.arange(10), 4)] == [4, 4]


def test_causal_attention_xl_cache_with_rope_equals_attention_over_both_segments():
    torch.manual_seed(0)
    xl = CausalAttention(32, 4, kv_heads=2, xl_cache=True, rope_base=10000.0)
    plain = CausalAttention(32, 4, kv_heads=2, rope_base=10000.0)
    plain.load_state_dict(xl.state_dict())
    x1, x2 = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    xl(x1)
    torch.testing.assert_close(xl(x2), plain(torch.cat([x1, x2], dim=1))[:, 6:], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="rope_base"):
        CausalAttention(32, 4, rope_base=0.5)


def _xl_memory_model_counting_memories():
    """(a small XL + memory model, its memory layer, the list that each forward of that layer
    appends the memory's counts per row to, as they are before the forward)."""
    torch.manual_seed(0)
    config = MemorizingConfig(vocab_size=64, dim=32, depth=4, heads=4, max_memories=128, topk=8, xl_cache=True)
    model = MemorizingTransformer(config)
    assert config.resolved_memory_layers() == [3]
    memory_layer = model.blocks[3].attn
    counts = []
    memory_layer.register_forward_pre_hook(lambda m, args: counts.append(
        m.memory.counts.tolist() if len(m.memory) else [0, 0]))
    return model, memory_layer, counts


def test_memorizing_transformer_trains_fills_memory_and_clears_it_per_document():
    model, memory_layer, counts = _xl_memory_model_counting_memories()
    log = train(model, _repeating_documents(4, 64), TrainSettings(steps=16, lr=3e-3, lr_memory=None, warmup=2,
                                                                  segment=16, batch_size=2), progress=False)
    assert sum(log["history"][-4:]) < sum(log["history"][:4])
    # xl cache: segment s enters memory when segment s+2 is read
    assert counts[:4] == [[0, 0], [0, 0], [16, 16], [32, 32]] and counts[4] == [0, 0]
    assert memory_layer.memory.counts.tolist() == [0, 0] and memory_layer.cache.entry is None
    with pytest.raises(ValueError, match="read it with context 0"):
        perplexity(model, _repeating_documents(1, 64), 16, context=16)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.full((1, 4), 64))
    with pytest.raises(ValueError, match="memory_layers must be layer indices"):
        MemorizingTransformer(MemorizingConfig(depth=2, memory_layers=[2]))


def test_train_cli_then_eval_checkpoint(tiny_model_dir, tmp_path, capsys):
    from knnmem.commands.eval import main as eval_main

    model_dir, docs = tiny_model_dir
    for i in range(4, 8):  # more documents for the by-name split: doc1/2/6 train, the rest validation
        (tmp_path / f"doc{i}.py").write_text(open(f"{docs}/doc{i % 4}.py").read())
    data = [docs, str(tmp_path)]
    out = tmp_path / "run"
    args = ["--model", model_dir, "--data", *data, "--output", str(out), "--doc-tokens", "160", "--segment", "32",
            "--context", "32", "--memory", "256", "--topk", "4", "--steps", "3", "--batch-size", "2",
            "--train", "lora", "--lora-rank", "2"]
    log = train_main(args)
    assert log["step"] == 3 and (out / "knnmem_trained.safetensors").exists()
    assert "validation ppl before training" in capsys.readouterr().out
    result = eval_main(["--model", model_dir, "--data", *data, "--json", str(tmp_path / "e.json"),
                        "--max-tokens", "96", "--segment", "32", "--configs", "xl+memory", "none",
                        "--checkpoint", str(out)])
    assert list(result["configs"]) == ["none", "xl+memory"]  # memory configs run last, on the checkpoint
    assert result["configs"]["xl+memory"]["memory_settings"]["mode"] == "gate"
    assert result["settings"]["checkpoint"] == "run"
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    load_trained(fresh, out)  # the documented one call
    assert fresh.knnmem.layers == [1]
    for bad, message in [(["--topk", "16"], "--topk comes from --checkpoint"),
                         (["--checkpoint", str(tmp_path)], "holds no knnmem_trained")]:
        with pytest.raises(SystemExit):
            eval_main(["--model", model_dir, "--data", docs, "--json", str(tmp_path / "e.json"), "--checkpoint",
                       str(out), *bad])
        assert message in capsys.readouterr().err
    other = ["--output", str(tmp_path / "other")]
    for bad, message in [([*other, "--steps", "0"], "steps must be a positive integer"),
                         ([*other, "--doc-tokens", "50"], "--doc-tokens (50) must exceed"),
                         ([*other, "--layers", "0,9"], "this model has layers 0..1"),
                         (["--output", str(tmp_path / "new"), "--resume"], "holds no checkpoint"),
                         ([], "already holds a checkpoint: continue it with --resume")]:
        before = (out / "knnmem_trained.safetensors").read_bytes()
        with pytest.raises(SystemExit):
            train_main([*args, *bad])
        assert message in capsys.readouterr().err
        assert (out / "knnmem_trained.safetensors").read_bytes() == before


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_with_both_documents(tiny_model_dir, tmp_path):
    """batch_size 1 in each of 2 processes (gradients averaged) = batch_size 2 in one."""
    import json
    import os
    import subprocess
    import sys

    model_dir, docs = tiny_model_dir
    common = ["--model", model_dir, "--data", docs, "--doc-tokens", "160", "--segment", "32", "--context", "32",
              "--memory", "256", "--topk", "4", "--steps", "4", "--train", "attention", "--lr", "1e-2"]
    train_main([*common, "--batch-size", "2", "--output", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "knnmem.train",
                    *common, "--batch-size", "1", "--output", str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, timeout=300)
    one, two = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("one", "two"))
    assert two["tokens"] == one["tokens"]
    assert two["history"] == pytest.approx(one["history"], rel=1e-5)  # fp32 sums in another order


def test_training_on_the_control_fills_memory_and_clears_it_per_document():
    """A few steps on the known-answer corpus (benchmarks/paper_table.py --preset control, tiny)."""
    model, memory_layer, counts = _xl_memory_model_counting_memories()
    g = torch.Generator().manual_seed(0)
    docs = [repeated_motifs(128, 64, [40], motif=(4, 8), generator=g)[0] for _ in range(4)]
    log = train(model, docs, TrainSettings(steps=16, lr=3e-3, lr_memory=None, warmup=2, segment=16, batch_size=2),
                progress=False)
    assert all(3.5 < loss < 4.6 for loss in log["history"]), log["history"]  # about chance (ln 64), never diverging
    # xl cache: segment s enters memory when segment s+2 is read; a new batch of documents starts empty
    assert counts[:8] == [[0, 0], [0, 0], [16, 16], [32, 32], [48, 48], [64, 64], [80, 80], [96, 96]]
    assert counts[8] == [0, 0]
    assert memory_layer.memory.counts.tolist() == [0, 0] and memory_layer.cache.entry is None


def test_training_on_the_control_learns_its_local_repeats():
    """The loss on copied tokens of held-out control documents falls well below chance within a
    few steps (motifs of 4 tokens repeated 8 times: the repeats lie 4 tokens back)."""
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig(vocab_size=16, dim=32, depth=2, heads=2, max_memories=64,
                                                   xl_cache=True))
    g = torch.Generator().manual_seed(0)
    docs = [repeated_motifs(256, 16, [80], motif=(4, 4), repeats=8, generator=g) for _ in range(40)]
    held_out = [tokens for tokens, _ in docs[38:]]
    copied = torch.stack([distance for _, distance in docs[38:]])[:, 1:] > 0

    def copy_loss() -> float:
        return token_losses(model, held_out, 32, 0, 2)[copied].mean().item()

    before = copy_loss()
    train(model, [tokens for tokens, _ in docs[:38]],
          TrainSettings(steps=150, lr=1e-2, lr_memory=None, warmup=5, segment=32, batch_size=8), progress=False)
    after = copy_loss()
    assert abs(before - math.log(16)) < 0.1 and after < before - 0.4, (before, after)


def test_repeated_motifs_copy_from_one_nearest_source_at_the_given_distances():
    g = torch.Generator().manual_seed(1)
    # a vocabulary large enough that random tokens never repeat a pair by chance
    tokens, distance = repeated_motifs(8192, 2**20, [160, 768, 3072], motif=(8, 24), repeats=3, recurring=0.3,
                                       generator=g)
    where = distance.nonzero()[:, 0]
    source = where - distance[where]
    assert torch.equal(tokens[where], tokens[source])  # each predictable token is its copy...
    assert torch.equal(tokens[where - 1], tokens[source - 1])  # ...and so is the token before it
    far = distance > 24
    assert set(distance[far].tolist()) == {160, 768, 3072}  # recurrences exactly at the distances asked for
    assert distance[~far].max() <= 24 and distance[(distance > 0) & ~far].min() >= 8  # repeats: one motif back
    assert 0.55 < (distance > 0).float().mean() < 0.7  # about (repeats - 1) / repeats of the tokens, less first tokens
    # the nearest source: no occurrence of a recurring motif lies between its source and its copy
    for t in far.nonzero()[:, 0].tolist()[::5]:
        d = int(distance[t])
        windows = tokens[t - d + 1:t].unfold(0, 2, 1)
        assert not (windows == tokens[t - 1:t + 1]).all(1).any(), t
    for bad in (dict(distances=[24]), dict(motif=(1, 8)), dict(motif=(9, 8)), dict(repeats=0), dict(recurring=1.0)):
        with pytest.raises(ValueError):
            repeated_motifs(4096, 64, **{**dict(distances=[160], motif=(8, 24)), **bad})


@pytest.mark.parametrize("nope_layers", [None, [1, 2]])
def test_an_xl_model_reads_the_second_segment_as_a_plain_model_reads_both(nope_layers):
    """At init and with autograd on: the XL cache holds exactly the keys/values a plain model
    computes for the first segment, at every layer (positions included; NoPE layers too)."""
    torch.manual_seed(0)
    base = dict(vocab_size=256, dim=64, depth=3, heads=4, memory_layers=[], nope_layers=nope_layers)
    plain = MemorizingTransformer(MemorizingConfig(**base))
    xl = MemorizingTransformer(MemorizingConfig(**base, xl_cache=True))
    xl.load_state_dict(plain.state_dict())
    ids = torch.randint(256, (2, 64))
    xl(ids[:, :32])
    torch.testing.assert_close(xl(ids[:, 32:]).logits, plain(ids).logits[:, 32:], atol=1e-5, rtol=1e-5)


def test_token_losses_are_what_perplexity_averages():
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig(vocab_size=64, dim=32, depth=2, heads=2, max_memories=64,
                                                   xl_cache=True))
    docs = _repeating_documents(3, 48)
    losses = token_losses(model, docs, 16, batch_size=2)
    assert losses.shape == (3, 47) and bool(torch.isfinite(losses).all())
    assert abs(perplexity(model, docs, 16, batch_size=2) - losses.double().mean().exp().item()) < 1e-4


def test_gradients_reach_every_parameter_through_the_xl_cache_and_memory_but_stop_at_what_they_hold():
    torch.manual_seed(0)
    model = MemorizingTransformer(MemorizingConfig(vocab_size=64, dim=32, depth=2, heads=2, max_memories=64, topk=4,
                                                   memory_layers=[1], xl_cache=True))
    ids = torch.randint(64, (2, 48))
    model(ids[:, :16])
    model(ids[:, 16:32])  # the first segment has left the XL cache: it is in memory now
    layer = model.blocks[1].attn
    assert layer.memory.counts.tolist() == [16, 16]
    assert not layer.memory.keys.requires_grad and not layer.cache.entry[0].requires_grad  # stored detached
    torch.nn.functional.cross_entropy(model(ids[:, 32:-1]).logits.reshape(-1, 64), ids[:, 33:].reshape(-1)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []  # the gate and memory scale too: the memory branch is on the loss's path


def test_refresh_cache_recomputes_the_xl_cache_with_current_weights_and_writes_no_memory():
    torch.manual_seed(0)
    model, memory_layer, _ = _xl_memory_model_counting_memories()
    ids = torch.randint(64, (2, 48))
    with torch.no_grad():
        model(ids[:, :16])
        model(ids[:, 16:32])
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # an optimizer step: the cache of ids[:, 16:32] is stale now
        stored = memory_layer.memory.counts.tolist()
        model.refresh_cache(ids[:, 16:32])
        assert memory_layer.memory.counts.tolist() == stored  # the stale entry was dropped, not written
        first = model.blocks[0].attn
        k = first.k_proj(model.blocks[0].norm1(model.embed(ids[:, 16:32])))
        torch.testing.assert_close(first.cache.entry[0], k.view(2, 16, 4, 8).transpose(1, 2))  # current weights
    log = train(model, [repeated_motifs(128, 64, [40], motif=(4, 8),
                                        generator=torch.Generator().manual_seed(i))[0] for i in range(2)],
                TrainSettings(steps=3, lr=1e-3, lr_memory=None, warmup=1, segment=16, batch_size=2, refresh_cache=True),
                progress=False)
    assert len(log["history"]) == 3
    with pytest.raises(ValueError, match="refresh_cache=True needs a model with XL caches"):
        train(torch.nn.Linear(2, 2), [torch.zeros(64, dtype=torch.long)] * 2,
              TrainSettings(steps=1, segment=16, batch_size=1, refresh_cache=True), progress=False)


def test_nope_layers_attend_without_positions_and_keep_the_weights_of_their_rotary_twin(recwarn):
    """nope_layers: those layers' local attention is unrotated (no XL warning: the layers below
    place the cache), the rest rotary; the weights are the rotary model's, so a pretrained rotary
    model loads; a memory layer among them cannot read memories at rotary positions."""
    base = dict(vocab_size=64, dim=32, depth=3, heads=2, xl_cache=True, memory_layers=[2])
    nope = MemorizingTransformer(MemorizingConfig(**base, nope_layers=[2]))
    assert [block.attn.rope_base for block in nope.blocks] == [10000.0, 10000.0, None]
    assert not [w for w in recwarn if "rope_base" in str(w.message)]
    rotary = MemorizingTransformer(MemorizingConfig(**base))
    nope.load_state_dict(rotary.state_dict())  # strict: the same parameters
    ids = torch.randint(64, (1, 16))
    assert not torch.allclose(nope(ids).logits, rotary(ids).logits)  # the last layer sees no positions
    with pytest.raises(ValueError, match="nope_layers must be layer indices"):
        MemorizingConfig(**base, nope_layers=[3]).validate()
    with pytest.raises(ValueError, match="a memory layer in nope_layers"):
        MemorizingConfig(**base, nope_layers=[2], memory_position="window_start").validate()
