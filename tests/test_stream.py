import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import knnmem
from knnmem import KNNAttention
from knnmem.stream import read, windows


@pytest.mark.parametrize("seed", range(20))
def test_windows_score_every_token_once_and_write_what_leaves_the_context(seed):
    rng = random.Random(seed)
    n, segment, context = rng.randint(2, 300), rng.randint(1, 64), rng.choice([0, rng.randint(1, 200)])
    ws = windows(n, segment, context)
    assert [t for w in ws for t in range(w.a + 1, w.b + 1) if t < n] == list(range(1, n))
    written = 0
    for w in ws:
        assert w.start == written  # memory holds exactly the tokens before the local context
        assert w.start == max(0, w.a - context) and w.write <= w.b - w.start
        written += w.write
    assert written == ws[-1].b  # the last window writes all of itself


def _llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def test_delayed_write_never_retrieves_a_token_still_in_the_local_context():
    model = _llama()
    handle = knnmem.patch(model, topk=64, max_memories=1000)
    ids = torch.randint(100, (1, 150), generator=torch.Generator().manual_seed(0))
    for w, _ in read(model, ids, segment=16, context=16, sinks=0):
        for layer, memory in handle.memories.items():
            indices = handle.last_indices[layer]
            assert int(indices.max()) < w.start  # slot = token index while nothing is evicted
            if w.start:
                assert int(indices.max()) == w.start - 1  # top-64 of everything stored reaches the latest
        # after the window: memory holds every token the next window no longer holds
        assert all(m.counts.tolist() == [w.start + w.write] for m in handle.memories.values())


def test_two_documents_side_by_side_stay_separate():
    model = _llama()
    knnmem.patch(model, topk=8, max_memories=64, pinned=4)  # 150 tokens overflow the 64-slot memory
    g = torch.Generator().manual_seed(1)
    docs = torch.randint(100, (2, 150), generator=g)
    together = torch.cat([logits for _, logits in read(model, docs, segment=16, context=16)], dim=1)
    for row in range(2):
        model.knnmem.reset()
        alone = torch.cat([logits for _, logits in read(model, docs[row:row + 1], segment=16, context=16)], dim=1)
        torch.testing.assert_close(together[row:row + 1], alone, atol=1e-5, rtol=1e-5)  # fp32, batched sums


def test_layer_xl_cache_delays_the_write_by_one_segment():
    layer = KNNAttention(32, 4, kv_heads=2, topk=100, max_memories=1000, xl_cache=True, rope_base=10000.0)
    T = 8
    for t in range(5):
        layer(torch.randn(2, T, 32))
        assert layer.memory.counts.tolist() == [max(0, t) * T] * 2  # segments 0..t-1 in memory
    _, indices = layer.memory.search(torch.randn(2, 4, T, 8), 100)
    assert int(indices.max()) == 4 * T - 1  # the latest segment (t=4) is only in the XL cache
    layer.reset_memory(rows=[1])
    layer(torch.randn(2, T, 32))
    assert layer.memory.counts.tolist() == [5 * T, 0]  # row 1's cached segment never enters memory


def _neox(layers):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=6, intermediate_size=64,
                           vocab_size=100, max_position_embeddings=256, rotary_pct=0.5)  # partial rotary, as Pythia
    return GPTNeoXForCausalLM(config).eval()


def _llama_layers(layers):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _llama_like(family):
    def make(layers):
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.for_model(family, hidden_size=48, num_hidden_layers=layers, num_attention_heads=6,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=64, vocab_size=100,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return AutoModelForCausalLM.from_config(config).eval()
    make.__name__ = family
    return make


def _read_all(model, ids, segment, context, sinks=0, cached=None):
    return torch.cat([logits for _, logits in read(model, ids, segment, context, sinks, cached=cached)], dim=1)


@pytest.mark.parametrize("make", [_llama_layers, _neox])
@pytest.mark.parametrize("context", [0, 16, 40])
def test_cached_reader_is_one_pass_attention_over_each_segment_and_its_context(make, context):
    """Every token through the model once: the cached reader equals one forward over the whole
    document in which each token of segment [a, a+16) attends to [a - context, itself]."""
    model = make(3)
    ids = torch.randint(100, (1, 150), generator=torch.Generator().manual_seed(0))
    t, j = torch.arange(150)[:, None], torch.arange(150)[None]
    allowed = (j <= t) & (j >= (t // 16) * 16 - context)
    with torch.no_grad():
        reference = model(ids, attention_mask=allowed[None, None]).logits
    cached = _read_all(model, ids, 16, context, cached=True)
    torch.testing.assert_close(cached, reference[:, :cached.shape[1]], atol=2e-6, rtol=1e-5)  # fp32


@pytest.mark.parametrize("make", [_llama_layers, _neox, _llama_like("qwen3"), _llama_like("gemma"), _llama_like("phi3"),
                                  _llama_like("olmo2")])
@pytest.mark.parametrize("context, sinks, memory", [(0, 0, False), (16, 0, False), (40, 0, False), (16, 4, False),
                                                    (0, 0, True), (16, 0, True), (40, 4, True)])
def test_cached_reader_equals_the_recomputing_reader_where_their_semantics_meet(make, context, sinks, memory):
    """With one layer a token's key does not depend on its context, so the two readers must agree
    on every configuration: local context, sinks, memory (what is written and retrieved)."""
    model = make(1)
    if memory:
        handle = knnmem.patch(model, topk=8, max_memories=1000)
    ids = torch.randint(100, (1, 150), generator=torch.Generator().manual_seed(1))
    recomputed = _read_all(model, ids, 16, context, sinks, cached=False)
    if memory:
        stored = {i: m.keys[:, :, :int(m.counts.max())].clone() for i, m in handle.memories.items()}
        handle.reset()
    cached = _read_all(model, ids, 16, context, sinks, cached=True)
    torch.testing.assert_close(cached, recomputed, atol=1e-6, rtol=1e-5)
    if memory:  # the same tokens, in the same slots (sinks never enter memory)
        assert {i: int(m.counts.max()) for i, m in handle.memories.items()} == \
               {i: k.shape[2] for i, k in stored.items()} == {0: 150 - sinks}
        for i, m in handle.memories.items():
            torch.testing.assert_close(m.keys[:, :, :stored[i].shape[2]], stored[i], atol=1e-6, rtol=1e-5)


def test_cached_reader_keeps_positions_inside_sinks_plus_context_plus_segment():
    model = _llama_layers(2)
    seen = []
    rotary = model.model.rotary_emb
    def record(module, args, kwargs, out):
        seen.append(int((args[1] if len(args) > 1 else kwargs["position_ids"]).max()))

    hook = rotary.register_forward_hook(record, with_kwargs=True)
    _read_all(model, torch.randint(100, (1, 300)), 16, 32, sinks=4, cached=True)
    hook.remove()
    assert max(seen) < 4 + 32 + 16  # a 300-token document never reaches position 52


def test_windows_with_sinks_score_every_token_once_and_never_write_the_sinks():
    ws = windows(200, 16, 32, sinks=4)
    assert [t for w in ws for t in range(w.a + 1, w.b + 1) if t < 200] == list(range(1, 200))
    assert all(w.start == 0 or w.start == w.a - 32 for w in ws)
    model = _llama_layers(2)
    handle = knnmem.patch(model, topk=8, max_memories=1000)
    _read_all(model, torch.randint(100, (1, 200)), 16, 32, sinks=4, cached=False)
    assert all(m.counts.tolist() == [196] for m in handle.memories.values())


def test_gpt2_is_read_by_recomputing():
    from transformers import GPT2Config, GPT2LMHeadModel

    from knnmem.stream import can_cache

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)).eval()
    assert not can_cache(model)
    assert _read_all(model, torch.randint(100, (1, 150)), 16, 16).shape == (1, 150, 100)  # beyond 64 positions
