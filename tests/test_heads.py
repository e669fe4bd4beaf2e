"""Memory in chosen heads only (`patch(heads=...)`) and the calibration that chooses them."""
import pytest
import torch

import knnmem
from knnmem.eval.calibration import choose_heads, head_scores
from test_patch import FAMILIES, VOCAB, tiny


def _attention_outputs(model, ids):
    """Per layer, the attention output before the output projection: (B, T, H, D)."""
    captured, hooks = {}, []
    for layer, module in enumerate(knnmem.hf.attention_modules(model)):
        projection = getattr(module, "o_proj", None) or getattr(module, "dense", None) or module.c_proj
        heads = model.config.num_attention_heads
        hooks.append(projection.register_forward_pre_hook(
            lambda m, args, layer=layer, heads=heads: captured.__setitem__(
                layer, args[0].reshape(*args[0].shape[:2], heads, -1).clone())))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return captured


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_without_memory_compute_what_the_unpatched_heads_compute(family):
    model = tiny(family)
    ids = torch.randint(VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    handle = knnmem.patch(model, heads={0: [1]}, topk=4, max_memories=64)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 40)))  # memory now holds 40 tokens of another text
    patched = _attention_outputs(model, ids)
    plan = handle.plans[0]  # the query heads searched: those of head 1's KV group (only head 1 without GQA)
    searched = dict(zip(plan.grouped.tolist(), handle.last_indices[0].unbind(1)))
    assert int(searched[1].min()) >= 0 and all(int(ix.max()) == -1 for h, ix in searched.items() if h != 1)
    knnmem.unpatch(model)
    plain = _attention_outputs(model, ids)
    others = [h for h in range(model.config.num_attention_heads) if h != 1]
    # Layer 0's heads without memory: transformers' own sdpa on their q/k/v (fp32, same kernel).
    torch.testing.assert_close(patched[0][:, :, others], plain[0][:, :, others], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(patched[0][:, :, 1], plain[0][:, :, 1], atol=1e-3)  # head 1 reads memory


def test_only_the_kv_heads_of_memory_heads_are_stored_and_searched():
    model = tiny("llama")  # 6 query heads on 2 KV heads: heads 0-2 read KV head 0, 3-5 KV head 1
    handle = knnmem.patch(model, heads=[(0, 4), (1, 0), (1, 2)], topk=4, max_memories=64)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 30)))
        model(torch.randint(VOCAB, (1, 30)))
    assert handle.layers == [0, 1]
    assert {i: m.heads for i, m in handle.memories.items()} == {0: 1, 1: 1}  # one KV head each
    assert handle.last_indices[0].shape[1] == 3  # layer 0: the three query heads of KV head 1
    assert (handle.last_indices[0][:, [0, 2]] == -1).all() and (handle.last_indices[0][:, 1] >= 0).all()


def test_memory_heads_retrieve_what_they_retrieve_when_every_head_has_memory():
    """Only heads with memory search; what they find equals the full patch's search for them."""
    first, second = torch.randint(VOCAB, (2, 30)), torch.randint(VOCAB, (2, 30))
    found = {}
    for heads in (None, [(1, 0), (1, 2), (1, 4)]):  # heads 0 and 2 share KV head 0, head 4 reads KV head 1
        model = tiny("llama")
        handle = knnmem.patch(model, heads=heads, layers=[1] if heads is None else None, topk=4, max_memories=64)
        with torch.no_grad():
            model(first)
            model(second)
        found[heads is None] = handle.last_indices[1]
    torch.testing.assert_close(found[False][:, [0, 2, 4]], found[True][:, [0, 2, 4]], rtol=0, atol=0)
    assert (found[False][:, [1, 3, 5]] == -1).all()


def test_heads_round_trip_through_save_patch_and_load_patch(tmp_path):
    model = tiny("llama")
    knnmem.patch(model, heads={1: [5, 3]})
    knnmem.save_patch(model, tmp_path)
    fresh = tiny("llama")
    handle = knnmem.load_patch(fresh, tmp_path)
    assert handle.patch_settings.heads == ((1, 3), (1, 5)) and handle.layers == [1]
    ids = torch.randint(VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("heads, message", [({0: [6]}, "query head in"), ({2: [0]}, "layer in"),
                                            ([(0, True)], "pairs"), ({}, "non-empty"), ("0:1", "dict")])
def test_bad_heads_are_refused_before_the_model_changes(heads, message):
    model = tiny("llama")
    with pytest.raises((ValueError, TypeError), match=message):
        knnmem.patch(model, heads=heads)
    assert getattr(model, "knnmem", None) is None
    with pytest.raises(ValueError, match="disagree"):
        knnmem.patch(model, heads={0: [1]}, layers=[1])


def test_knowledge_needs_memory_in_every_head():
    model = tiny("llama")
    handle = knnmem.patch(model, heads={0: [1]})
    with pytest.raises(ValueError, match="every query head"):
        handle.memorize(torch.randint(VOCAB, (20,)))


def test_head_scores_vanish_when_the_window_holds_everything_and_rank_the_heads():
    model = tiny("llama")
    ids = torch.randint(VOCAB, (1, 64), generator=torch.Generator().manual_seed(2))
    scores = head_scores(model, [ids[0]], span=64, local=8, sinks=2, queries=16, progress=False)
    assert scores.shape == (2, 6) and bool((scores >= 0).all())
    wide = head_scores(model, [ids[0]], span=64, local=64, sinks=2, queries=16, progress=False)
    assert float(wide.abs().max()) < 1e-5  # a window holding everything changes nothing
    assert choose_heads(scores, 3) == sorted(choose_heads(scores, 3))
    top = scores.flatten().argmax()
    assert choose_heads(scores, 1) == [(int(top) // 6, int(top) % 6)]


def test_calibrate_measures_every_candidate_and_keeps_the_best():
    model = tiny("llama")
    docs = [torch.randint(VOCAB, (96,), generator=torch.Generator().manual_seed(3))]
    seen = []

    def measure(m):
        seen.append(m.knnmem.patch_settings.heads)
        return 10.0 - len(seen)  # the last candidate measures best

    import knnmem.eval.calibration as calibration

    result = calibration.calibrate(model, docs, counts=[2, 4], segment=16, span=64, measure=measure, progress=False,
                                   max_memories=64)
    assert list(result["runs"]) == ["all", "2", "4"] and seen[0] is None and len(seen[1]) == 2
    assert result["best"] == "4" and len(result["heads"]) == 4
    assert getattr(model, "knnmem", None) is None
    seen.clear()  # runs measure 9 (all), 8 (2 heads), 7 (4 heads): 8 is within 20% of 7, with fewer heads
    result = calibration.calibrate(model, docs, counts=[2, 4], segment=16, span=64, measure=measure, progress=False,
                                   max_memories=64, tolerance=0.2)
    assert result["best"] == "2" and len(result["heads"]) == 2
    with pytest.raises(ValueError, match="tolerance"):
        calibration.calibrate(model, docs, counts=[2], measure=measure, tolerance=1.5)
    seen.clear()  # a budget of 3 heads: neither every head (12) nor 4 is measured
    result = calibration.calibrate(model, docs, counts=[2, 4], segment=16, span=64, measure=measure, progress=False,
                                   max_memories=64, max_heads=3)
    assert list(result["runs"]) == ["2"] and result["best"] == "2" and len(seen) == 1


def test_neighbours_widen_what_memory_heads_read_and_leave_the_others_empty():
    """neighbours=1 reads each hit with the tokens beside it: the hits of neighbours=0 are among
    them, heads without memory still read nothing, and the output changes."""
    first, second = torch.randint(VOCAB, (1, 30)), torch.randint(VOCAB, (1, 30))
    found, outputs = {}, {}
    for n in (0, 1):
        model = tiny("llama")
        handle = knnmem.patch(model, heads=[(1, 0), (1, 4)], topk=2, max_memories=64, neighbours=n)
        with torch.no_grad():
            model(first)
            outputs[n] = model(second).logits
        found[n] = handle.last_indices[1]
    assert found[1].shape[-1] == 3 * found[0].shape[-1]
    for q in range(30):
        assert set(found[0][0, 0, q].tolist()) <= set(found[1][0, 0, q].tolist())
        wide = found[1][0, 0, q]
        assert len(set(wide[wide >= 0].tolist())) == int((wide >= 0).sum()) > 2
    assert (found[1][:, [1, 2, 3, 5]] == -1).all()  # the heads of both KV groups without memory
    assert not torch.allclose(outputs[0], outputs[1])
    with pytest.raises(ValueError, match="neighbours"):
        knnmem.patch(tiny("llama"), neighbours=-1)


def test_a_query_block_shares_the_search_of_the_sum_of_its_queries():
    """query_block=4: positions 4j..4j+3 read the same memories, those the sum of their memory
    queries finds; query_block=1 is every query on its own (the default)."""
    from knnmem.handle import search_blocks

    memory = knnmem.KNNMemory(1, 2, 8, 64, backend="exact", normalize=False)
    memory.add(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    queries = torch.randn(1, 4, 10, 8)
    shared = search_blocks(memory, queries, 3, 4)
    assert shared.shape == (1, 4, 10, 3)
    for j, start in enumerate(range(0, 10, 4)):
        summed = queries[:, :, start:start + 4].sum(dim=2, keepdim=True)
        expected = memory.search(summed, 3)[1]
        assert torch.equal(shared[:, :, start:start + 4], expected.expand(-1, -1, min(4, 10 - start), -1))
    assert torch.equal(search_blocks(memory, queries, 3, 1), memory.search(queries, 3)[1])
    real = torch.ones(1, 10, dtype=torch.bool)
    real[0, :2] = False  # padding adds nothing to its block's sum
    padded = search_blocks(memory, queries, 3, 4, real)
    assert torch.equal(padded[:, :, :4], memory.search(queries[:, :, 2:4].sum(2, keepdim=True), 3)[1].expand(-1, -1, 4, -1))
    model = tiny("llama")
    knnmem.patch(model, topk=2, query_block=8)
    with torch.no_grad():
        model(torch.randint(VOCAB, (1, 30)))
        model(torch.randint(VOCAB, (1, 30)))
    found = model.knnmem.last_indices[0]
    assert torch.equal(found[:, :, :8], found[:, :, :1].expand(-1, -1, 8, -1))
    with pytest.raises(ValueError, match="query_block"):
        knnmem.patch(tiny("llama"), query_block=0)
