"""`knnmem.adapters.ResidualMemory`: attach / detach exactness and training."""
import pytest
import torch

from knnmem import adapters
from knnmem.train import TrainSettings, train_adapter
from test_patch import FAMILIES, VOCAB, tiny


def _ids(shape, seed):
    return torch.randint(VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_with_a_closed_gate_and_detach_leave_the_model_bit_for_bit(family):
    model = tiny(family)
    ids = _ids((2, 16), 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model(ids).logits
    adapter = adapters.attach(model)
    assert adapters.attached(model) is adapter and adapter.gate.item() == 0.0
    assert torch.equal(model(ids).logits, reference)
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    assert not torch.equal(model(ids).logits, reference)  # the adapter is in the forward pass
    assert any("residual_memory" in name for name in model.state_dict())
    assert adapters.detach(model) is adapter
    assert torch.equal(model(ids).logits, reference)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert adapters.attached(model) is None


def test_attach_places_the_adapter_at_three_quarters_depth_and_refuses_misuse():
    model = tiny("llama")  # 2 blocks: default block 1
    adapters.attach(model, bottleneck=16)
    assert hasattr(adapters.decoder_blocks(model)[1], "residual_memory")
    with pytest.raises(ValueError, match="already has"):
        adapters.attach(model)
    adapters.detach(model)
    with pytest.raises(ValueError, match="no ResidualMemory"):
        adapters.detach(model)
    with pytest.raises(ValueError, match="layer must be"):
        adapters.attach(model, layer=2)
    with pytest.raises(ValueError, match="bottleneck"):
        adapters.ResidualMemory(48, bottleneck=0)
    with pytest.raises(TypeError, match="model_type"):
        adapters.attach(torch.nn.Linear(2, 2))
    assert adapters.default_layer(30) == 22


def test_train_adapter_lowers_the_loss_and_changes_nothing_else():
    model = tiny("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = adapters.attach(model, bottleneck=32)
    documents = [_ids((90,), 1), _ids((70,), 2)]  # memorised over and over
    settings = TrainSettings(steps=40, lr=1e-2, lr_memory=1e-2, warmup=2, segment=32, validate_every=0,
                             save_every=0)
    log = train_adapter(model, documents, settings, progress=False)
    assert len(log["history"]) == 40
    assert sum(log["history"][-5:]) / 5 < sum(log["history"][:5]) / 5 - 0.3
    assert adapter.gate.item() != 0.0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())  # base weights unchanged
    assert all(p.requires_grad for p in model.parameters())  # restored as they were
    with pytest.raises(ValueError, match="fewer than one piece"):
        train_adapter(model, [_ids((10,), 3)], settings, progress=False)
    adapters.detach(model)
    with pytest.raises(ValueError, match="attached"):
        train_adapter(model, documents, settings, progress=False)
