import json
import math

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import save_file

from knnmem import KNNMemory
from knnmem.synthetic import clustered_keys

BACKENDS = ["exact", "flat", "ivf", "hnsw"]


def _stream_ids(memory: KNNMemory, total: int, chunk_sizes, seed=0):
    """Stream `total` tokens per row; value[..., 0] holds the token's id (its write position)."""
    g = torch.Generator().manual_seed(seed)
    B, H, D = memory.batch_size, memory.heads, memory.head_dim
    keys_by_id, written, i = [], 0, 0
    while written < total:
        n = min(chunk_sizes[i % len(chunk_sizes)], total - written)
        keys = torch.nn.functional.normalize(torch.randn(B, H, n, D, generator=g), dim=-1)
        values = torch.zeros(B, H, n, D)
        values[..., 0] = torch.arange(written, written + n, dtype=torch.float32)
        memory.add(keys, values)
        keys_by_id.append(keys)
        written += n
        i += 1
    return torch.cat(keys_by_id, dim=2)  # (B, H, total, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifo_after_10x_overflow_ids_match_stored_rows(backend):
    M = 300
    memory = KNNMemory(2, 2, 16, M, backend=backend, backend_options={"nlist": 8} if backend == "ivf" else None)
    keys = _stream_ids(memory, 10 * M + 17, chunk_sizes=[37, 64, 5, 91])
    total = keys.shape[2]
    # The store holds exactly the last M tokens of every (row, head).
    stored_ids = memory.values[..., 0].long()
    for b in range(2):
        for h in range(2):
            assert sorted(stored_ids[b, h].tolist()) == list(range(total - M, total))
    # Every returned index points at the stored row that produced its score (no id drift),
    # and querying with a recent token's own key finds that token.
    recent = keys[:, :, total - 40:]
    scores, idx = memory.search(recent, 4)
    stored_k, stored_v = memory.gather(idx)
    assert (idx >= 0).all()
    torch.testing.assert_close(scores, torch.einsum("bhtd,bhtkd->bhtk", recent, stored_k), atol=1e-5, rtol=0)
    top_ids = stored_v[..., 0, 0].long()
    expected = torch.arange(total - 40, total).expand(2, 2, 40)
    assert (top_ids == expected).float().mean() >= (1.0 if backend in ("exact", "flat") else 0.95)
    # A token older than M is gone: its own key no longer scores 1.
    old_scores, _ = memory.search(keys[:, :, :5], 1)
    assert (old_scores < 0.999).all()


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_approximate_recall_against_exact_on_clustered_keys(backend):
    # At 64K memories, the size from which the approximate backends are worth using (below
    # that, exact search is as fast: see benchmarks/results/memory_cpu.json).
    g = torch.Generator().manual_seed(1)
    M, D, k = 65536, 64, 32
    data = clustered_keys(M + 256, D, generator=g).reshape(1, 1, M + 256, D)
    keys, queries = data[:, :, :M], data[:, :, M:]
    exact, approx = KNNMemory(1, 1, D, M, backend="exact"), KNNMemory(1, 1, D, M, backend=backend)
    for memory in (exact, approx):
        for start in range(0, M, 8192):
            memory.add(keys[:, :, start:start + 8192], keys[:, :, start:start + 8192])
    _, truth = exact.search(queries, k)
    _, found = approx.search(queries, k)
    hits = (found[..., :, None] == truth[..., None, :]).any(-1).float().mean().item()
    assert hits >= 0.9, f"{approx.backend}: recall@{k} = {hits:.3f}"


def test_flat_equals_exact():
    g = torch.Generator().manual_seed(2)
    memories = [KNNMemory(2, 2, 8, 100, backend=b) for b in ("exact", "flat")]
    keys = torch.randn(2, 2, 70, 8, generator=g)
    for memory in memories:
        memory.add(keys, keys)
    queries = torch.randn(2, 4, 6, 8, generator=g)
    (s1, i1), (s2, i2) = (m.search(queries, 100) for m in memories)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)
    assert (i1[..., 70:] == -1).all() and torch.isneginf(s1[..., 70:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_and_heads_are_isolated(backend):
    g = torch.Generator().manual_seed(3)
    together = KNNMemory(2, 2, 8, 64, backend=backend)
    keys = torch.randn(2, 2, 50, 8, generator=g)
    together.add(keys, keys)
    queries = torch.randn(2, 4, 5, 8, generator=g)  # GQA: query heads 0,1 -> KV head 0; 2,3 -> 1
    s, i = together.search(queries, 8)
    for b in range(2):
        for h in range(2):
            alone = KNNMemory(1, 1, 8, 64, backend=backend)
            alone.add(keys[b:b + 1, h:h + 1], keys[b:b + 1, h:h + 1])
            s1, i1 = alone.search(queries[b:b + 1, 2 * h:2 * h + 2].reshape(1, 1, 10, 8), 8)
            assert torch.equal(i[b, 2 * h:2 * h + 2].reshape(10, 8), i1[0, 0])
            torch.testing.assert_close(s[b, 2 * h:2 * h + 2].reshape(10, 8), s1[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_rows(backend):
    memory = KNNMemory(2, 1, 8, 64, backend=backend)
    keys = torch.randn(2, 1, 20, 8)
    memory.add(keys, keys)
    memory.clear(rows=[0])
    assert memory.counts.tolist() == [0, 20]
    _, idx = memory.search(keys, 3)
    assert (idx[0] == -1).all() and (idx[1] >= 0).all()
    memory.add(keys[:, :, :5], keys[:, :, :5])  # row 0 restarts at slot 0
    assert memory.counts.tolist() == [5, 25]
    _, idx = memory.search(keys[:, :, :5], 1)
    assert idx[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    memory.clear()
    assert len(memory) == 0


def test_mask_never_stores_padding():
    memory = KNNMemory(2, 1, 4, 16, backend="exact")
    values = torch.arange(6.0).view(1, 1, 6, 1).expand(2, 1, 6, 4).contiguous()
    mask = torch.tensor([[True, True, False, True, False, False], [False] * 6])
    memory.add(torch.randn(2, 1, 6, 4), values, mask=mask)
    assert memory.counts.tolist() == [3, 0]
    assert memory.values[0, 0, :3, 0].tolist() == [0.0, 1.0, 3.0]


def test_normalize_false_keeps_raw_inner_product():
    memory = KNNMemory(1, 1, 4, 8, normalize=False)
    keys = torch.tensor([[[[1.0, 0, 0, 0], [3.0, 0, 0, 0]]]])
    memory.add(keys, keys)
    scores, idx = memory.search(torch.tensor([[[[2.0, 0, 0, 0]]]]), 2)
    assert idx.flatten().tolist() == [1, 0] and scores.flatten().tolist() == [6.0, 2.0]
    normalized = KNNMemory(1, 1, 4, 8)
    normalized.add(keys, keys)
    scores, _ = normalized.search(torch.tensor([[[[2.0, 0, 0, 0]]]]), 2)
    assert scores.flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(tmp_path, backend):
    memory = KNNMemory(2, 2, 8, 40, backend=backend)
    _stream_ids(memory, 130, chunk_sizes=[30])
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    loaded = KNNMemory.load(path)
    assert loaded.backend == memory.backend and loaded.counts.tolist() == memory.counts.tolist()
    queries = torch.randn(2, 2, 7, 8)
    for a, b in zip(memory.search(queries, 5), loaded.search(queries, 5)):
        assert torch.equal(a, b)
    # Writes continue at the same ring position after loading.
    for m in (memory, loaded):
        m.add(torch.ones(2, 2, 3, 8), torch.ones(2, 2, 3, 8))
    assert torch.equal(memory.values, loaded.values)


def test_load_rejects_truncated_and_mismatched_files(tmp_path):
    memory = KNNMemory(1, 1, 4, 8)
    path = tmp_path / "m.safetensors"
    memory.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable knnmem memory file"):
        KNNMemory.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"keys": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="no knnmem metadata"):
        KNNMemory.load(tmp_path / "other.safetensors")
    meta = '{"format_version": 1, "batch_size": 1, "heads": 2, "head_dim": 4, "max_memories": 8, ' \
           '"normalize": true, "backend": "exact", "backend_options": {}, "dtype": "float32"}'
    save_file({"keys": memory.keys, "values": memory.values, "written": memory.written},
              str(tmp_path / "bad.safetensors"), metadata={"knnmem": meta})
    with pytest.raises(ValueError, match="tensor 'keys' must be"):
        KNNMemory.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.add(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError, "keys must have shape"),
        (lambda m: m.add(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)), ValueError, "size 2 at dim 1"),
        (lambda m: m.add(torch.randn(2, 2, 4, 6), torch.randn(2, 2, 4, 6)), ValueError, "size 8 at dim 3"),
        (lambda m: m.add(torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)), ValueError, "size 2 at dim 0"),
        (lambda m: m.add(torch.ones(2, 2, 4, 8, dtype=torch.long), torch.ones(2, 2, 4, 8)), TypeError, "floating"),
        (lambda m: m.add(torch.full((2, 2, 4, 8), math.nan), torch.ones(2, 2, 4, 8)), ValueError, "NaN or inf"),
        (lambda m: m.add(torch.ones(2, 2, 4, 8), torch.full((2, 2, 4, 8), math.inf)), ValueError, "values contains NaN"),
        (lambda m: m.add(torch.ones(2, 2, 4, 8), torch.ones(2, 2, 5, 8)), ValueError, "shape of keys"),
        (lambda m: m.add(torch.ones(2, 2, 4, 8), torch.ones(2, 2, 4, 8), mask=torch.ones(2, 4)), TypeError, "bool"),
        (lambda m: m.add(torch.ones(2, 2, 4, 8), torch.ones(2, 2, 4, 8), mask=torch.ones(2, 5, dtype=torch.bool)),
         ValueError, "mask must have shape"),
        (lambda m: m.search(torch.randn(2, 3, 4, 8), 4), ValueError, "multiple of H=2"),
        (lambda m: m.search(torch.randn(2, 2, 4, 7), 4), ValueError, "size 8 at dim 3"),
        (lambda m: m.search(torch.randn(2, 2, 8), 4), ValueError, "queries must have shape"),
        (lambda m: m.search(torch.randn(2, 2, 4, 8), 0), ValueError, "k must be a positive integer"),
        (lambda m: m.search(torch.randn(2, 2, 4, 8), -3), ValueError, "k must be a positive integer"),
        (lambda m: m.clear(rows=[5]), ValueError, r"rows must be integers in \[0, 2\)"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    memory = KNNMemory(2, 2, 8, 16)
    with pytest.raises(error, match=match):
        call(memory)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_memories"):
        KNNMemory(1, 1, 8, 0)
    with pytest.raises(ValueError, match="backend must be one of"):
        KNNMemory(1, 1, 8, 8, backend="annoy")
    with pytest.raises(TypeError, match="dtype"):
        KNNMemory(1, 1, 8, 8, dtype=torch.int32)


def test_auto_backend_is_visible():
    assert KNNMemory(1, 1, 8, 1024).backend == "exact"
    assert KNNMemory(1, 1, 8, 1 << 20).backend.startswith("ivf(")


@pytest.mark.parametrize("backend", ["exact", "ivf", "hnsw"])
def test_pinned_tokens_survive_ten_times_overflow(backend):
    """The first `pinned` tokens of a row stay; the other slots hold the latest tokens (FIFO)."""
    M, P = 40, 5
    memory = KNNMemory(2, 2, 8, M, backend=backend, pinned=P, backend_options={"min_train": 16} if backend == "ivf" else None)
    g = torch.Generator().manual_seed(0)
    written = 0
    for chunk in [7, 13, 1, 29, 50, 3, 97, 200] + [1] * 10:  # 410 tokens, > 10x M; some writes exceed M
        keys = torch.randn(2, 2, chunk, 8, generator=g)
        values = torch.zeros(2, 2, chunk, 8)
        values[..., 0] = torch.arange(written, written + chunk, dtype=torch.float32)
        memory.add(keys, values)
        written += chunk
    assert written > 10 * M and memory.counts.tolist() == [M, M]
    ordinals = sorted(memory.values[1, 1, :, 0].long().tolist())
    assert ordinals == list(range(P)) + list(range(written - (M - P), written))
    # every stored row is retrievable, and retrieval returns the slot it is stored at
    _, idx = memory.search(memory.keys[:, :, :M].clone(), 1)
    torch.testing.assert_close(idx[..., 0], torch.arange(M).expand(2, 2, M))


def test_pinned_must_leave_room_for_fifo():
    for bad in (-1, 40, 41, True, 2.0):
        with pytest.raises(ValueError, match="pinned"):
            KNNMemory(1, 1, 8, 40, pinned=bad)


def test_ivf_trains_early_and_retrains_as_the_row_grows():
    from knnmem.synthetic import clustered_keys

    g = torch.Generator().manual_seed(0)
    memory = KNNMemory(1, 1, 32, 16384, backend="ivf", backend_options={"min_train": 512})
    exact = KNNMemory(1, 1, 32, 16384, backend="exact")
    data = clustered_keys(8192 + 256, 32, clusters=64, generator=g).reshape(1, 1, -1, 32)
    lists = []
    for chunk in data[:, :, :8192].split(512, dim=2):
        memory.add(chunk, chunk)
        exact.add(chunk, chunk)
        index = memory._search.indexes[0][0]
        lists.append(index.nlist if index is not None else 0)
    assert lists[0] == 13 and lists[3] == 52 and lists[-1] == 128  # 512 // 39, then 4x growth, capped
    _, found = memory.search(data[:, :, 8192:], 8)
    _, truth = exact.search(data[:, :, 8192:], 8)
    recall = (found[..., :, None] == truth[..., None, :]).any(-1).float().mean()
    assert recall > 0.9  # approximate by design; nprobe 8 of 128 lists on 64 clusters


# ---------------------------------------------------------------- untrusted input (hardening)
def _saved(tmp_path, backend="exact", **kwargs):
    memory = KNNMemory(2, 2, 8, 40, backend=backend, **kwargs)
    memory.add(torch.randn(2, 2, 50, 8), torch.randn(2, 2, 50, 8))
    path = tmp_path / "m.safetensors"
    memory.save(path)
    return memory, path


def _rewrite(path, out, meta_change=None, tensor_change=None):
    """Copy a memory file with edited metadata (dict -> dict or str) and/or tensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["knnmem"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_change is not None:
        meta = meta_change(meta)
    if tensor_change is not None:
        tensor_change(tensors)
    save_file(tensors, str(out), metadata={"knnmem": meta if isinstance(meta, str) else json.dumps(meta)})
    return out


def _set(key, value):
    return lambda m: {**m, key: value}


@pytest.mark.parametrize("change, field", [
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: {k: v for k, v in m.items() if k != "heads"}, "'heads'"),
    (_set("dtype", "__class__"), "'dtype'"),
    (_set("dtype", "int64"), "'dtype'"),
    (_set("backend", "bogus"), "'backend'"),
    (_set("normalize", "yes"), "'normalize'"),
    (_set("batch_size", 0), "'batch_size'"),
    (_set("max_memories", 10**12), "tensor 'keys'"),
    (_set("pinned", 40), "pinned"),
    (_set("backend_options", {"m": 0}), "backend_options"),
    (lambda m: {**m, "backend": "hnsw", "backend_options": {"m": 0}}, "option m must be"),
    (lambda m: {**m, "backend": "hnsw", "backend_options": {"m": -1}}, "option m must be"),
    (lambda m: {**m, "backend": "ivf", "backend_options": {"nlist": 10**9}}, "option nlist must be"),
    (lambda m: {**m, "backend": "ivf", "backend_options": {"nlist": 1e9}}, "option nlist must be"),
    (_set("format_version", 99), "format_version"),
])
def test_load_validates_every_metadata_field(tmp_path, change, field):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.safetensors", meta_change=change)
    with pytest.raises(ValueError, match="bad.safetensors") as err:
        KNNMemory.load(bad)
    assert field in str(err.value)


@pytest.mark.parametrize("written", [[-1, 3], [2**60, 3]])
def test_load_rejects_impossible_written_counts(tmp_path, written):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   tensor_change=lambda t: t.update(written=torch.tensor(written)))
    with pytest.raises(ValueError, match="'written'"):
        KNNMemory.load(bad)


@pytest.mark.parametrize("backend", ["ivf", "hnsw"])
def test_load_verifies_saved_indexes(tmp_path, backend):
    """An index whose ids are not the row's slots (another row's, out of range) or that is not an
    index at all is refused, never searched."""
    memory, path = _saved(tmp_path, backend=backend, backend_options={"min_train": 16} if backend == "ivf" else None)
    small = KNNMemory(1, 1, 8, 100, backend=backend, backend_options={"min_train": 16} if backend == "ivf" else None)
    small.add(torch.randn(1, 1, 60, 8), torch.randn(1, 1, 60, 8))  # ids 0..59 > the 40 slots of a row
    foreign = small._search.state_tensors()["index.0.0"]
    cases = {"ids": lambda t: t.update({"index.0.1": foreign}),
             "readable": lambda t: t.update({"index.0.1": torch.tensor([1, 2, 3], dtype=torch.uint8)}),
             "row <": lambda t: t.update({"index.7.0": t["index.0.0"].clone()})}
    for field, change in cases.items():
        bad = _rewrite(path, tmp_path / f"bad_{backend}.safetensors", tensor_change=change)
        with pytest.raises(ValueError, match=field):
            KNNMemory.load(bad)


def test_gather_rejects_indices_out_of_range():
    memory = KNNMemory(2, 1, 4, 10)
    memory.add(torch.randn(2, 1, 10, 4), torch.randn(2, 1, 10, 4))
    for bad in (10, -2):
        indices = torch.zeros(2, 1, 3, 2, dtype=torch.long)
        indices[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"indices must be slots in \[0, M=10\)"):
            memory.gather(indices)


@pytest.mark.parametrize("rows", [[True, False], [0.0], 1.5, [0, 5], [-1], torch.tensor([0.0]),
                                  torch.tensor([True]), "0"])
def test_clear_rejects_loose_rows_before_clearing_any(rows):
    memory = KNNMemory(2, 1, 4, 10)
    memory.add(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4))
    with pytest.raises((ValueError, TypeError), match="rows"):
        memory.clear(rows)
    assert memory.counts.tolist() == [5, 5]  # nothing was cleared
    memory.clear(torch.tensor([False, True]))
    assert memory.counts.tolist() == [5, 0]


def test_values_beyond_the_store_dtype_are_refused():
    memory = KNNMemory(1, 1, 4, 10, dtype=torch.float16, normalize=False)
    big = torch.full((1, 1, 2, 4), 1e5)  # finite in fp32, inf in fp16
    with pytest.raises(ValueError, match="beyond the range"):
        memory.add(big, torch.ones(1, 1, 2, 4))
    with pytest.raises(ValueError, match="beyond the range"):
        memory.add(torch.ones(1, 1, 2, 4), big)
    assert len(memory) == 0


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    memory, path = _saved(tmp_path)
    before = path.read_bytes()
    import knnmem.files as memory_module

    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(memory_module, "save_file", full_disk)
    memory.add(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    with pytest.raises(OSError, match="No space"):
        memory.save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_auto_picks_exact_for_raw_keys_and_small_memories():
    assert KNNMemory(1, 1, 8, 65536, normalize=False).backend == "exact"
    assert KNNMemory(1, 1, 8, 16384).backend == "exact"
    assert KNNMemory(1, 1, 8, 65536).backend.startswith("ivf")


def test_blocked_exact_search_equals_brute_force():
    """Several 64-query blocks and 16K-memory chunks, rows holding different counts."""
    from knnmem.search import exact_search

    g = torch.Generator().manual_seed(0)
    keys, queries = torch.randn(2, 1, 20000, 8, generator=g), torch.randn(2, 1, 130, 8, generator=g)
    counts = torch.tensor([20000, 17000])
    scores, indices = exact_search(keys, counts, queries, 5)
    for row in range(2):
        full = queries[row, 0] @ keys[row, 0, :counts[row]].T
        expected_s, expected_i = full.topk(5, dim=-1)
        torch.testing.assert_close(scores[row, 0], expected_s)
        assert torch.equal(indices[row, 0], expected_i)


def test_grouped_chunk_topk_equals_topk():
    """The group-maxima top-k: ragged widths, masked (-inf) tails, fewer finite scores than k."""
    from knnmem.search import _chunk_topk

    g = torch.Generator().manual_seed(1)
    for width, k, finite in [(5000, 8, 5000), (4097, 3, 4000), (2048, 8, 5), (300, 8, 300)]:
        scores = torch.randn(2, 3, 7, width, generator=g)
        scores[..., finite:] = float("-inf")
        top_s, top_i = _chunk_topk(scores, k)
        expected_s, _ = scores.topk(k, dim=-1)
        torch.testing.assert_close(top_s.sort(-1, descending=True).values, expected_s, atol=0, rtol=0)
        real = torch.isfinite(top_s)
        assert (top_i[real] < finite).all()
        torch.testing.assert_close(scores.gather(-1, top_i.clamp(max=width - 1))[real], top_s[real], atol=0, rtol=0)


def test_slots_grow_with_what_is_written_not_with_capacity(tmp_path):
    memory = KNNMemory(2, 3, 8, max_memories=65536, normalize=False)
    assert memory.keys.shape == (2, 3, 0, 8) and memory.keys.nbytes == 0
    keys, values = torch.randn(2, 3, 700, 8), torch.randn(2, 3, 700, 8)
    memory.add(keys[:, :, :8], values[:, :, :8])
    assert memory.keys.shape[2] == 256  # 8 tokens: the first allocation, not 65,536 slots
    memory.add(keys[:, :, 8:300], values[:, :, 8:300])
    memory.add(keys[:, :, 300:], values[:, :, 300:])
    assert memory.keys.shape[2] == 1024 and memory.counts.tolist() == [700, 700]
    torch.testing.assert_close(memory.keys[:, :, :700], keys, atol=0, rtol=0)  # growth kept every row in place
    torch.testing.assert_close(memory.values[:, :, :700], values, atol=0, rtol=0)
    small = KNNMemory(1, 1, 8, max_memories=300, pinned=10)
    small.add(torch.randn(1, 1, 1000, 8), torch.randn(1, 1, 1000, 8))
    assert small.keys.shape[2] == 300  # never beyond the capacity
    memory.save(tmp_path / "m.safetensors")
    loaded = KNNMemory.load(tmp_path / "m.safetensors")
    assert loaded.keys.shape[2] == 1024 and torch.equal(loaded.keys, memory.keys)


def test_a_patched_models_memory_is_sized_by_what_it_read():
    from transformers import LlamaConfig, LlamaForCausalLM

    import knnmem

    model = LlamaForCausalLM(LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=100)).eval()
    handle = knnmem.patch(model)  # capacity 65,536 per (row, head)
    with torch.no_grad():
        model(torch.randint(100, (8, 8)))
    assert handle.stats()["bytes"] == 2 * 2 * (8 * 2 * 256 * 8 * 4)  # layers x (keys, values) x 256 slots


def test_auto_searches_exactly_until_the_store_holds_the_crossover():
    """`auto` with a large capacity on a CPU picks IVF, but by what is stored: exact below 16384 keys."""
    from knnmem.search import exact_search

    memory = KNNMemory(1, 2, 16, max_memories=65536)
    assert "exact below 16384" in memory.backend
    keys = torch.randn(1, 2, 4096, 16)
    memory.add(keys, keys)
    queries = torch.randn(1, 2, 64, 16)
    _, indices = memory.search(queries, 32)
    _, expected = exact_search(memory.keys, memory.counts, torch.nn.functional.normalize(queries, dim=-1), 32)
    assert torch.equal(indices, expected)  # recall 1.0 at 4,096 stored keys


def test_exact_search_needs_no_faiss_and_faiss_backends_say_what_is_missing():
    """The GPU machine has no FAISS: knnmem imports and searches exactly without it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['faiss'] = None\n"
            "import torch, knnmem\n"
            "from knnmem import KNNMemory\n"
            "m = KNNMemory(1, 2, 8, 64, backend='exact'); m.add(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))\n"
            "assert m.search(torch.randn(1, 2, 3, 8), 4)[1].shape == (1, 2, 3, 4)\n"
            "try:\n    KNNMemory(1, 2, 8, 64, backend='flat')\n"
            "except ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs FAISS: pip install faiss-cpu" in done.stdout


@pytest.mark.parametrize("written, pinned", [(7, 0), (11, 2), (29, 2), (40, 0)])
def test_neighbours_are_the_stored_tokens_next_in_the_document(written, pinned):
    """Each hit's neighbours are the tokens at ordinals o-n..o+n that the ring still holds (values
    carry each token's ordinal), each once per query, also across the wrap and the pinned slots."""
    M, n = 8, 2
    memory = KNNMemory(2, 1, 4, M, pinned=pinned, backend="exact", normalize=False)
    ordinals = torch.arange(written, dtype=torch.float32)
    for start in range(0, written, 3):  # several writes, as a stream does
        chunk = ordinals[start:start + 3]
        x = chunk.view(1, 1, -1, 1).expand(2, 1, -1, 4).contiguous()
        memory.add(torch.randn_like(x), x)
    held = {int(o) for o in memory.values[0, 0, :int(memory.counts[0]), 0]}
    hits = torch.tensor([[0, 3], [5, 5], [7, -1], [-1, -1]]).clamp(max=int(memory.counts[0]) - 1)
    indices = hits.view(1, 1, 4, 2).expand(2, 3, 4, 2)  # 3 query heads of the one KV head, 2 rows
    found = memory.with_neighbours(indices, n)
    assert found.shape == (2, 3, 4, 2 * (2 * n + 1))
    for q in range(4):
        slots = found[1, 2, q]
        got = [int(memory.values[1, 0, s, 0]) for s in slots[slots >= 0]]
        assert len(got) == len(set(got)), "a memory read twice by one query"
        hit_ordinals = {int(memory.values[1, 0, s, 0]) for s in hits[q] if s >= 0}
        expected = {o + j for o in hit_ordinals for j in range(-n, n + 1)} & held
        assert set(got) == expected
    assert torch.equal(memory.with_neighbours(indices, 0), indices)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        memory.with_neighbours(indices, -1)


def test_an_empty_owned_memory_follows_the_input_to_its_device_and_batch():
    from knnmem.memory import memory_for_batch

    options = dict(heads=1, head_dim=4, max_memories=8)
    empty = KNNMemory(1, **options)
    moved = memory_for_batch(empty, 2, "reset()", device=torch.device("meta"), **options)
    assert moved is not empty and moved.device.type == "meta" and moved.batch_size == 2
    assert memory_for_batch(empty, 1, "reset()", owned=False, device=torch.device("meta"), **options) is empty
    empty.add(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    assert memory_for_batch(empty, 1, "reset()", device=torch.device("meta"), **options) is empty  # holds tokens
