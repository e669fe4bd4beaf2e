import math

import pytest
import torch
import torch.nn.functional as F

from knnmem import KNNAttention


def _layer(**kw):
    torch.manual_seed(0)
    options = dict(dim=32, heads=4, kv_heads=2, topk=4, max_memories=64, memory_backend="exact")
    options.update(kw)
    return KNNAttention(**options)


def _plain_attention(layer, x, prev=None):
    """The same projections through plain causal sdpa (optionally over [prev segment; x])."""
    B, T, _ = x.shape

    def split(proj, inp, heads):
        return proj(inp).view(B, -1, heads, layer.head_dim).transpose(1, 2)

    q = split(layer.q_proj, x, layer.heads)
    source = x if prev is None else torch.cat([prev, x], dim=1)
    k, v = split(layer.k_proj, source, layer.kv_heads), split(layer.v_proj, source, layer.kv_heads)
    S = k.shape[2]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def test_first_segment_with_empty_memory_equals_sdpa():
    layer = _layer()
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), _plain_attention(layer, x), atol=1e-6, rtol=1e-5)


def test_closed_gate_ignores_memory_and_xl_cache_extends_the_window():
    with pytest.warns(UserWarning, match="xl_cache=True without rope_base"):  # unordered segments: said
        layer = _layer(xl_cache=True, rope_base=None)
    with torch.no_grad():
        layer.gate.fill_(-math.inf)
    x1, x2 = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    layer(x1)
    assert len(layer.memory) == 0  # x1 is local context (the XL cache), not memory yet
    torch.testing.assert_close(layer(x2), _plain_attention(layer, x2, prev=x1), atol=1e-6, rtol=1e-5)
    assert len(layer.memory) == 2 * 6  # x1 left the cache: now it is in memory


@pytest.mark.parametrize("mode", ["gate", "joint"])
def test_rows_streamed_together_equal_rows_streamed_alone(mode):
    """Row 0 streams document A for 4 segments; row 1 streams B, then starts C at segment 2."""
    torch.manual_seed(1)
    A, B, C = (torch.randn(1, 4, 5, 32) for _ in range(3))
    together = _layer(mode=mode)
    outs = []
    for s in range(4):
        if s == 2:
            together.reset_memory(rows=[1])
        row1 = B[:, s] if s < 2 else C[:, s - 2]
        outs.append(together(torch.cat([A[:, s], row1])))

    def alone(segments):
        layer = _layer(mode=mode)
        return [layer(seg) for seg in segments]

    for s, out in enumerate(alone([A[:, s] for s in range(4)])):
        torch.testing.assert_close(outs[s][0:1], out, atol=1e-6, rtol=1e-5)
    expected_row1 = alone([B[:, 0], B[:, 1]]) + alone([C[:, 0], C[:, 1]])
    for s, out in enumerate(expected_row1):
        torch.testing.assert_close(outs[s][1:2], out, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(outs[3][1:2], _plain_attention(together, C[:, 1]))  # memory is used


def test_padding_tokens_are_not_written_and_gradients_reach_parameters_only():
    layer = _layer()
    x = torch.randn(2, 6, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    layer(x, attention_mask=mask)
    assert layer.memory.counts.tolist() == [6, 4]
    layer(x, attention_mask=mask).sum().backward()
    assert layer.gate.grad.abs().sum() > 0 and layer.memory_scale.grad.abs().sum() > 0
    assert layer.q_proj.weight.grad.abs().sum() > 0
    assert not layer.memory.keys.requires_grad


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        KNNAttention(32, 4, kv_heads=3)
    with pytest.raises(ValueError, match="dim .* divisible by heads"):
        KNNAttention(30, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        KNNAttention(32, 4, mode="sum")
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, dim=32\)"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"x must have shape"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        layer(torch.randn(2, 5, 32), attention_mask=torch.ones(2, 4))
    layer(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="call reset_memory"):
        layer(torch.randn(3, 5, 32))
    layer.reset_memory()
    assert layer(torch.randn(3, 5, 32)).shape == (3, 5, 32)


def test_a_users_memory_of_another_batch_size_is_never_replaced():
    from knnmem import KNNMemory

    memory = KNNMemory(2, 2, 8, 100)
    layer = KNNAttention(32, 4, kv_heads=2, memory=memory)
    with pytest.raises(ValueError, match="memory given has batch_size=2"):
        layer(torch.randn(3, 5, 32))
    assert layer.memory is memory
    for kwargs, message in [(dict(max_memories=0), "max_memories"), (dict(memory_backend="bogus"), "backend"),
                            (dict(pinned=100), "pinned"), (dict(memory="mem"), "memory must be a KNNMemory")]:
        with pytest.raises((ValueError, TypeError), match=message):
            KNNAttention(32, 4, **{"max_memories": 100, **kwargs})


def test_the_memory_exists_before_the_first_forward_and_takes_the_inputs_batch():
    layer = _layer(xl_cache=True)
    assert layer.rope_base == 10000.0 and _layer().rope_base is None  # rotary with an XL cache by default
    assert len(layer.memory) == 0 and "stored=[0]" in repr(layer)
    layer.reset_memory(rows=[2])  # rows of the batch to come: nothing to forget yet
    layer(torch.randn(3, 5, 32))
    layer(torch.randn(3, 5, 32))
    assert layer.memory.counts.tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="rows must be integers in"):
        layer.reset_memory(rows=[3])


def test_memories_read_at_the_window_start_score_as_keys_at_its_first_position():
    """memory_position="window_start": the rotated query scores each memory (stored without
    position) as it would score a local key at rotary position 0; one joint softmax over both."""
    from knnmem.positions import apply_rotary, rope_angles

    layer = _layer(heads=2, kv_heads=2, topk=8, mode="joint", logits="raw", rope_base=10000.0,
                   memory_position="window_start")
    first, second = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    with torch.no_grad():
        layer(first)  # no XL cache: the first segment goes to memory, all 8 retrieved below
        out = layer(second)
        split = lambda proj, x, h: proj(x).view(1, 8, h, layer.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = (split(p, second, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
        memory_k, memory_v = split(layer.k_proj, first, 2), split(layer.v_proj, first, 2)
        cos, sin = rope_angles(8, layer.head_dim, 10000.0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        local = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), -math.inf)
        scores = torch.cat([local, q @ memory_k.transpose(-1, -2)], -1) * layer.head_dim**-0.5
        expected = scores.softmax(-1) @ torch.cat([v, memory_v], 2)
        expected = layer.o_proj(expected.transpose(1, 2).reshape(1, 8, -1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs rope_base"):
        _layer(memory_position="window_start", rope_base=None)
