import math

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

import knnmem
from knnmem.positions import apply_rotary, undo_rotary

VOCAB = 100


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                           bos_token_id=0, eos_token_id=0))
    elif family == "gpt_neox":  # Pythia-style partial rotary (25% of each head)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=VOCAB, rotary_pct=0.25,
                                                 max_position_embeddings=256))
    else:  # Llama with grouped-query attention, like SmolLM2 (3 query heads per KV head)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                             max_position_embeddings=256))
    return model.eval()


FAMILIES = ["gpt2", "gpt_neox", "llama"]
# Llama-like families (q/k/v/o projections, rotary): Qwen3 normalises q and k per head, Gemma scales
# its embeddings and has its own head_dim; all go through transformers' attention interface.
LLAMA_LIKE = ["mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo", "olmo2", "granite"]


def tiny_llama_like(family: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                  num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=VOCAB,
                                  max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family, why", [("gemma2", "soft-caps the logits"), ("cohere", "interleaved pairs")])
def test_families_whose_attention_memory_would_misread_are_refused_with_the_reason(family, why):
    with pytest.raises(TypeError, match=f"model_type='{family}'.*{why}"):
        knnmem.patch(tiny_llama_like(family))


def test_opt_patches_reads_memory_and_unpatches_exactly():
    """OPT: absolute learned positions (as GPT-2), attention through AttentionInterface."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, ffn_dim=64,
                                     word_embed_proj_dim=48, vocab_size=VOCAB, max_position_embeddings=256,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    ids, mask = _padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        knnmem.patch(model, mode="gate", gate_init=0.0)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], reference[real], atol=ATOL, rtol=0)
        assert (model(ids, attention_mask=mask).logits[real] - reference[real]).abs().max() > 1e-3  # memory is read
        knnmem.unpatch(model)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_llama_like_families_patch_read_memory_and_unpatch_exactly(family, tmp_path):
    model = tiny_llama_like(family)
    ids, mask = _padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        handle = knnmem.patch(model, mode="gate", gate_init=0.0)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], reference[real], atol=ATOL, rtol=0)
        assert handle.stats()["stored_per_row"] == {0: [12, 8], 1: [12, 8]}
        changed = model(ids, attention_mask=mask).logits
        assert (changed[real] - reference[real]).abs().max() > 1e-3  # memory is read
        knnmem.save_patch(model, tmp_path)
        knnmem.unpatch(model)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference, atol=0, rtol=0)
        knnmem.load_patch(model, tmp_path)
        assert model.knnmem.settings == handle.settings
# fp32 logits of the same math computed by differently ordered sums (sdpa vs our reference).
ATOL = 1e-5


def _padded_batch():
    ids = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_memory_and_closed_gate_reproduce_the_model(family):
    model = tiny(family)
    ids, mask = _padded_batch()
    real = mask.bool()
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        handle = knnmem.patch(model)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], reference[real], atol=ATOL, rtol=0)
        assert handle.stats()["stored_per_row"] == {0: [12, 8], 1: [12, 8]}  # padding never written
        changed = model(ids, attention_mask=mask).logits  # now memory holds the same tokens
        assert (changed[real] - reference[real]).abs().max() > 1e-3
        knnmem.unpatch(model)
        knnmem.patch(model, mode="gate", gate_init=-math.inf)
        model(ids, attention_mask=mask)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], reference[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_model_bit_identically(family):
    model = tiny(family)
    ids, mask = _padded_batch()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(ids, attention_mask=mask).logits
    knnmem.patch(model, layers=[1], mode="gate")
    assert len(knnmem.memory_parameters(model)) == 2
    assert any("knn_gate" in k for k in model.state_dict())
    model(ids, attention_mask=mask)
    knnmem.unpatch(model)
    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert torch.equal(model(ids, attention_mask=mask).logits, before)
    assert knnmem.memory_parameters(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_documents_in_one_batch_equal_documents_alone(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(2)
    docs = torch.randint(VOCAB, (2, 3, 10), generator=g)  # 2 documents x 3 segments x 10 tokens
    handle = knnmem.patch(model, topk=4)
    with torch.no_grad():
        together = [model(docs[:, s]).logits for s in range(3)]
        for row in range(2):
            handle.reset()
            for s in range(3):
                alone = model(docs[row:row + 1, s]).logits
                torch.testing.assert_close(together[s][row:row + 1], alone, atol=ATOL, rtol=0)


def test_a_fact_beyond_the_window_is_retrieved():
    """Layer 0 of a Llama, with W_q = W_k: an un-rotated query of a token has cosine 1 with that
    token's stored un-rotated key. Retrieval must point at the fact's positions in the document
    (slots = token positions while the memory has not overflowed)."""
    model = tiny("llama")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        per_head = attn.k_proj.weight.view(2, attn.head_dim, -1)  # (KV heads, D, width)
        attn.q_proj.weight.copy_(per_head.repeat_interleave(3, dim=0).reshape(6 * attn.head_dim, -1))
    handle = knnmem.patch(model, layers=[0], topk=4, logits="normalized", position="none", mode="gate")
    g = torch.Generator().manual_seed(3)
    fact = torch.tensor([3, 4, 5])
    filler = torch.randint(10, VOCAB, (1, 80), generator=g)
    document = torch.cat([filler[:, :5], fact[None], filler[:, 5:]], dim=1)  # fact at positions 5, 6, 7
    with torch.no_grad():
        for start in range(0, 64, 16):  # 4 segments of 16 tokens: the fact leaves the window
            model(document[:, start:start + 16])
        query = torch.cat([filler[:, 60:70], fact[None]], dim=1)
        model(query)
    top1 = handle.last_indices[0][0, :, -3:, 0]  # (heads, the three fact tokens)
    assert (top1 == torch.tensor([5, 6, 7])).all(), top1


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_stored_keys_are_the_unrotated_projections(family):
    model = tiny(family)
    captured = {}
    attn = model.base_model.layers[1].self_attn if family == "llama" else model.base_model.layers[1].attention
    proj = attn.k_proj if family == "llama" else attn.query_key_value

    def grab(_, __, out):
        captured["k"] = out

    proj.register_forward_hook(grab)
    handle = knnmem.patch(model, layers=[1], position="none")
    ids = torch.randint(VOCAB, (1, 9))
    with torch.no_grad():
        model(ids)
    heads = attn.config.num_attention_heads
    D = attn.config.hidden_size // heads
    if family == "llama":
        keys = captured["k"].view(1, 9, -1, D).transpose(1, 2)
    else:  # fused q, k, v per head
        keys = captured["k"].view(1, 9, heads, 3 * D).transpose(1, 2)[..., D:2 * D]
    torch.testing.assert_close(handle.memories[1].keys[:, :, :9], keys, atol=1e-5, rtol=1e-5)


def test_rotary_round_trip():
    x = torch.randn(2, 3, 5, 8)
    angles = torch.randn(2, 5, 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # R=4 of D=8
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:]) and not torch.allclose(y, x)
    torch.testing.assert_close(undo_rotary(y, cos, sin), x)


def test_generate_save_load_and_document_scopes(tmp_path):
    model = tiny("llama")
    handle = knnmem.patch(model, topk=4)
    ids = torch.randint(VOCAB, (1, 20))
    with torch.no_grad():
        model(ids)
        with handle.frozen():
            out = model.generate(ids[:, -5:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    assert handle.stats()["stored_per_row"][0] == [20]  # frozen: generate wrote nothing
    handle.save(tmp_path)
    handle.reset()
    assert handle.stats()["stored_per_row"][0] == [0]
    handle.load(tmp_path)
    assert handle.stats()["stored_per_row"][0] == [20]
    with handle.document():
        assert handle.stats()["stored_per_row"][0] == [0]
        with torch.no_grad():
            model(ids)
    assert handle.stats()["stored_per_row"][0] == [0]


def test_bad_calls_raise_clear_errors():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    with pytest.raises(TypeError, match=r"supports transformers models of types \('gpt2', 'gpt_neox', 'llama', 'mistral'"):
        knnmem.patch(bert)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"layers must be a non-empty list of layer indices in \[0, 2\)"):
        knnmem.patch(model, layers=[2])
    with pytest.raises(ValueError, match="position must be one of"):
        knnmem.patch(model, position="end")
    with pytest.raises(ValueError, match="not patched"):
        knnmem.unpatch(model)
    knnmem.patch(model)
    with pytest.raises(ValueError, match="already patched"):
        knnmem.patch(model)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 5)))
        with pytest.raises(ValueError, match="call reset"):
            model(torch.randint(VOCAB, (2, 5)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(topk=0), "topk must be a positive integer"),
    (dict(max_memories=0), "max_memories must be a positive integer"),
    (dict(memory_backend="bogus"), "backend must be one of"),
    (dict(pinned=-1), "pinned must be"),
    (dict(distance=-5), "distance must be"),
    (dict(layers=[True]), "layers must be"),
    (dict(layers=[0.0]), "layers must be"),
    (dict(layers=[]), "layers must be"),
    (dict(gate_init=float("nan")), "gate_init"),
])
def test_patch_validates_every_argument_before_changing_the_model(kwargs, message):
    model = tiny("llama")
    with pytest.raises(ValueError, match=message):
        knnmem.patch(model, **kwargs)
    assert getattr(model, "knnmem", None) is None and model.config._attn_implementation != "knnmem"


def _filled_handle(tmp_path, **kwargs):
    model = tiny("llama")
    handle = knnmem.patch(model, topk=4, max_memories=64, **kwargs)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 20)))
    handle.save(tmp_path)
    return model, handle


def test_handle_load_stays_inside_its_folder_and_checks_consistency(tmp_path):
    import json

    model, handle = _filled_handle(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "handle.json").read_text())
    outside = tmp_path / "outside.safetensors"
    handle.memories[0].save(outside)
    for files, message in [({"0": "../outside.safetensors"}, "not a memory file"),
                           ({"0": str(outside)}, "not a memory file"),
                           ({"zero": meta["files"]["0"]}, "not a memory file"),
                           ({"1": meta["files"]["0"]}, "not a memory file"),
                           ([1, 2], "'files' must map")]:
        (tmp_path / "mem" / "handle.json").write_text(json.dumps({**meta, "files": files}))
        with pytest.raises(ValueError, match=message):
            handle.load(tmp_path / "mem")
    (tmp_path / "mem" / "handle.json").write_text("{bad json")
    with pytest.raises(ValueError, match="not a readable knnmem handle"):
        handle.load(tmp_path / "mem")
    # a memory saved by a handle of other settings does not load into this one
    for other in (dict(logits="normalized"), dict(pinned=3)):
        _, other_handle = _filled_handle(tmp_path / str(other), **other)
        with pytest.raises(ValueError, match="does not match this handle"):
            handle.load(tmp_path / str(other))


def test_interrupted_handle_save_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    model, handle = _filled_handle(tmp_path)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 10)))  # 30 tokens now; the saved snapshot has 20
    import knnmem.files

    real_save_file, calls = knnmem.files.save_file, []

    def fail_on_second_layer(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(knnmem.files, "save_file", fail_on_second_layer)
    with pytest.raises(OSError):
        handle.save(tmp_path)
    monkeypatch.undo()
    handle.load(tmp_path)
    assert handle.stats()["stored_per_row"] == {0: [20], 1: [20]}  # the whole old snapshot, not a mix


def test_trained_parameters_round_trip_through_save_pretrained(tmp_path):
    model = tiny("llama")
    knnmem.patch(model, topk=4, mode="gate", logits="normalized", pinned=2, layers=[1])
    with torch.no_grad():
        for p in knnmem.memory_parameters(model):
            p.copy_(torch.randn(p.shape))
    model.save_pretrained(tmp_path)
    knnmem.save_patch(model, tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    handle = knnmem.load_patch(loaded, tmp_path)
    assert handle.layers == [1] and handle.mode == "gate" and handle.pinned == 2
    for a, b in zip(knnmem.memory_parameters(model), knnmem.memory_parameters(loaded)):
        assert torch.equal(a, b)
    ids = torch.randint(VOCAB, (1, 24))
    model.knnmem.reset()
    with torch.no_grad():
        for segment in ids.split(8, dim=1):
            torch.testing.assert_close(model(segment).logits, loaded(segment).logits)
    knnmem.unpatch(loaded)
    with pytest.raises(ValueError, match="not a readable knnmem patch file"):
        knnmem.load_patch(loaded, tmp_path / "missing")


def test_default_pins_the_first_tokens_of_a_document():
    model = tiny("llama")
    assert knnmem.patch(model).pinned == 64
    knnmem.unpatch(model)
    assert knnmem.patch(model, max_memories=40).pinned == 20  # half of a smaller memory


def test_generate_without_frozen_warns_once_that_it_writes_what_its_cache_holds():
    model = tiny("llama")
    handle = knnmem.patch(model, max_memories=256)
    prompt = torch.randint(VOCAB, (1, 10))
    with pytest.warns(UserWarning, match="KV cache"):
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.reset()
        with handle.frozen():
            model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)  # warned once already
