"""Knowledge memory (`MemoryHandle.memorize`, `knnmem.knowledge`)."""
import pytest
import torch

import knnmem
from knnmem.knowledge import KnowledgeMemory, Storage, sparsify
from test_patch import FAMILIES, VOCAB, tiny

# Knowledge is stored in fp16; a document memory on the CPU in fp32. Compared with a document
# memory whose stored keys/values were rounded to fp16, only the order of fp32 sums differs.
ATOL = 1e-5


def _ids(n: int, seed: int, rows: int | None = None) -> torch.Tensor:
    shape = (n,) if rows is None else (rows, n)
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _round_document_memory_to_fp16(handle):
    for memory in handle.memories.values():
        memory.keys.copy_(memory.keys.half().float())
        memory.values.copy_(memory.values.half().float())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["joint", "gate"])
def test_knowledge_equals_a_document_memory_holding_the_same_tokens(family, mode):
    """Memorised text X, then document X2 read with it, then Y: the same as reading X, X2, Y into
    the document memory, when top-k retrieves everything (the two memories' retrievals are one set)."""
    model = tiny(family)
    x, x2, y = _ids(30, 1), _ids(12, 2)[None], _ids(10, 3)[None]
    handle = knnmem.patch(model, topk=64, mode=mode, gate_init=0.3)
    handle.memorize(x, progress=False)
    assert all(len(m) == 0 for m in handle.memories.values())  # memorize leaves the document memory alone
    model(x2, use_cache=False)
    with_knowledge = model(y, use_cache=False).logits

    handle.knowledge = None
    handle.reset()
    model(x[None], use_cache=False)
    _round_document_memory_to_fp16(handle)
    model(x2, use_cache=False)
    reference = model(y, use_cache=False).logits
    torch.testing.assert_close(with_knowledge, reference, atol=ATOL, rtol=0)
    handle.reset()
    model(x2, use_cache=False)
    assert (model(y, use_cache=False).logits - reference).abs().max() > 1e-4  # X did matter


def test_reset_leaves_knowledge_and_batch_rows_read_it_alike():
    model = tiny("llama")
    handle = knnmem.patch(model, topk=8)
    knowledge = handle.memorize([_ids(40, 1), [1, 2, 3, 4, 5]], progress=False)
    stored = (len(knowledge), knowledge.tokens, knowledge.texts)
    assert stored == (45, 45, 2)
    y = _ids(10, 4, rows=2)
    first = model(y, use_cache=False).logits
    handle.reset()
    assert (len(knowledge), knowledge.tokens, knowledge.texts) == stored and handle.knowledge is knowledge
    torch.testing.assert_close(model(y, use_cache=False).logits, first, atol=0, rtol=0)
    handle.reset()
    alone = model(y[1:], use_cache=False).logits  # row 1 read alone sees the same knowledge
    torch.testing.assert_close(first[1:], alone, atol=ATOL, rtol=0)
    handle.reset()
    knnmem.unpatch(model)
    plain = model(y, use_cache=False).logits
    assert (first - plain).abs().max() > 1e-3  # knowledge did change the outputs


@pytest.mark.parametrize("form", ["fp16", "sparse", "pq"])
def test_save_and_load_give_identical_retrievals_and_outputs(form, tmp_path):
    model = tiny("llama")  # head dim 8
    storage = Storage(form, keep=4, chunk=16, pq_m=4, pq_bits=4)
    handle = knnmem.patch(model, topk=8)
    knowledge = handle.memorize([_ids(70, 1), _ids(50, 2)], storage=storage, progress=False)
    y = _ids(12, 3, rows=2)
    logits = model(y, use_cache=False).logits
    q = torch.randn(2, 6, 12, 8)
    before = knowledge.search(0, q, 8)
    knowledge.save(tmp_path / "knowledge.safetensors")

    fresh = tiny("llama")
    fresh_handle = knnmem.patch(fresh, topk=8)
    fresh_handle.knowledge = KnowledgeMemory.load(tmp_path / "knowledge.safetensors")
    loaded = fresh_handle.knowledge
    assert (loaded.tokens, loaded.texts, len(loaded), loaded.storage) == (120, 2, len(knowledge), storage)
    for a, b in zip(before, loaded.search(0, q, 8)):
        assert torch.equal(a, b)
    torch.testing.assert_close(fresh(y, use_cache=False).logits, logits, atol=0, rtol=0)


def test_two_knowledge_memories_do_not_mix():
    model = tiny("llama")
    handle = knnmem.patch(model, topk=8)
    a = handle.memorize(_ids(40, 1), progress=False)
    y = _ids(10, 3)[None]
    with_a = model(y, use_cache=False).logits
    snapshot = {i: (s.keys.clone(), s.values.clone()) for i, s in a.stores.items()}
    handle.knowledge = None
    b = handle.memorize(_ids(40, 2), progress=False)
    assert b is not a and a.tokens == b.tokens == 40
    for i, store in a.stores.items():  # building b left a as it was
        assert torch.equal(store.keys, snapshot[i][0]) and torch.equal(store.values, snapshot[i][1])
    with_b = model(y, use_cache=False).logits
    handle.reset()
    handle.knowledge = a
    torch.testing.assert_close(model(y, use_cache=False).logits, with_a, atol=0, rtol=0)
    assert (with_a - with_b).abs().max() > 1e-4
    rows_k, _, valid = a.search(0, torch.randn(1, 6, 5, 8), 8)  # every row read is one of a's
    stored = a.stores[0].keys.float()
    for h in range(6):
        for row in rows_k[0, h][valid[0, h]]:
            assert (stored[h // 3] == row).all(-1).any()


def test_sparse_form_keeps_the_most_attended_tokens_per_head_and_chunk():
    keys = torch.arange(2 * 10 * 1, dtype=torch.float32).reshape(2, 10, 1)
    importance = torch.tensor([[0, 9, 1, 8, 2, 3, 7, 0, 0, 5], [9, 1, 2, 3, 4, 3, 2, 1, 0, 1.0]])
    k, v = sparsify(keys, -keys, importance, keep=2, chunk=4)  # chunks [0:4], [4:8], [8:10]
    assert k[0, :, 0].tolist() == [1, 3, 5, 6, 8, 9]
    assert k[1, :, 0].tolist() == [10, 13, 14, 15, 18, 19]
    assert torch.equal(v, -k)


def test_bytes_per_token_of_each_form():
    model = tiny("llama")  # 2 layers, 2 KV heads, head dim 8
    sizes = {}
    for storage in (Storage("fp16"), Storage("sparse", keep=4, chunk=16), Storage("pq", pq_m=4, pq_bits=4)):
        handle = knnmem.patch(model)
        sizes[storage.form] = handle.memorize(_ids(64, 1), storage=storage, progress=False).bytes_per_token()
        knnmem.unpatch(model)
    layers_heads = 2 * 2
    assert sizes["fp16"] == layers_heads * 2 * 8 * 2  # keys and values, fp16
    assert sizes["sparse"] == sizes["fp16"] * 4 / 16
    assert sizes["pq"] == layers_heads * 2 * 4 * 4 / 8  # 4 codes of 4 bits, packed


def test_generate_reads_knowledge_with_a_kv_cache():
    model = tiny("llama")
    handle = knnmem.patch(model, topk=4)
    handle.memorize(_ids(30, 1), progress=False)
    with handle.frozen():
        out = model.generate(_ids(6, 2)[None], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (1, 10) and all(len(m) == 0 for m in handle.memories.values())


def test_bad_knowledge_input_is_refused(tmp_path):
    model = tiny("llama")
    handle = knnmem.patch(model)
    with pytest.raises(ValueError, match="tokenizer"):
        handle.memorize("some text")
    with pytest.raises(ValueError, match="empty"):
        handle.memorize(torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        handle.memorize([torch.randn(5)])
    with pytest.raises(ValueError, match="storage must be one of"):
        handle.memorize(_ids(10, 1), storage="int8")
    with pytest.raises(ValueError, match="at least 256 tokens"):
        handle.memorize(_ids(10, 1), storage=Storage("pq", pq_m=4), progress=False)
    handle.knowledge = None
    handle.memorize(_ids(10, 1), progress=False)
    with pytest.raises(ValueError, match="same storage"):
        handle.memorize(_ids(10, 1), storage="sparse", progress=False)
    with pytest.raises(TypeError, match="KnowledgeMemory"):
        handle.knowledge = "knowledge"
    path = tmp_path / "k.safetensors"
    handle.knowledge.save(path)
    other = tiny("gpt_neox")
    other_handle = knnmem.patch(other)
    with pytest.raises(ValueError, match="another model"):
        other_handle.knowledge = KnowledgeMemory.load(path)
    retrained = tiny("llama")
    with torch.no_grad():
        retrained.get_input_embeddings().weight.add_(0.01)
    with pytest.raises(ValueError, match="model="):
        knnmem.patch(retrained).knowledge = KnowledgeMemory.load(path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        KnowledgeMemory.load(tmp_path / "bad.safetensors")
