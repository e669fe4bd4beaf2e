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
    for w, _ in read(model, ids, segment=16, context=16):
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
    layer = KNNAttention(32, 4, kv_heads=2, topk=100, max_memories=1000, xl_cache=True)
    T = 8
    for t in range(5):
        layer(torch.randn(2, T, 32))
        assert layer.memory.counts.tolist() == [max(0, t) * T] * 2  # segments 0..t-1 in memory
    _, indices = layer.memory.search(torch.randn(2, 4, T, 8), 100)
    assert int(indices.max()) == 4 * T - 1  # the latest segment (t=4) is only in the XL cache
    layer.reset_memory(rows=[1])
    layer(torch.randn(2, T, 32))
    assert layer.memory.counts.tolist() == [5 * T, 0]  # row 1's cached segment never enters memory
