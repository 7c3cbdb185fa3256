"""The MoCo branch (docs/methods.md NCL "Self-supervision"; issue 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayexperts.models import MocoExperts, MultiExpertNet
from rayexperts.models import moco as moco_module
from rayexperts.models.moco import MocoBranch, MocoConfig


def tiny_branch(queue_size: int = 5, dim: int = 2, momentum: float = 0.9) -> tuple[torch.nn.Linear, MocoBranch]:
    encoder = torch.nn.Linear(3, 4)
    return encoder, MocoBranch(encoder, 4, MocoConfig(dim=dim, hidden=0, queue_size=queue_size, momentum=momentum))


def test_momentum_update_by_hand() -> None:
    encoder, branch = tiny_branch(momentum=0.9)
    with torch.no_grad():
        branch.key_encoder.weight.fill_(2.0)
        encoder.weight.fill_(4.0)
    branch.momentum_update(encoder)
    assert torch.allclose(branch.key_encoder.weight, torch.full((4, 3), 0.9 * 2.0 + 0.1 * 4.0))
    assert torch.equal(encoder.weight, torch.full((4, 3), 4.0))
    assert branch.proj[0].out_features == 4  # hidden 0: the feature dimension


def test_queue_fifo_with_wrap_around() -> None:
    _, branch = tiny_branch(queue_size=5)
    a, b = F.normalize(torch.randn(3, 2), dim=1), F.normalize(torch.randn(3, 2), dim=1)
    old = branch.queue.clone()
    assert torch.allclose(old.norm(dim=1), torch.ones(5))
    branch.enqueue(a)
    branch.enqueue(b)  # b[0], b[1] fill slots 3, 4; b[2] wraps around to slot 0
    assert torch.equal(branch.queue, torch.stack([b[2], a[1], a[2], b[0], b[1]]))
    assert int(branch.queue_ptr) == 1


def test_keys_are_gathered_from_all_ranks_before_enqueue(monkeypatch) -> None:
    def fake_all_gather(parts: list[torch.Tensor], x: torch.Tensor) -> None:
        for rank, part in enumerate(parts):
            part.copy_(x + 10 * rank)

    monkeypatch.setattr(moco_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(moco_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(moco_module.dist, "all_gather", fake_all_gather)
    _, branch = tiny_branch(queue_size=6)
    keys = torch.arange(4.0).view(2, 2)
    branch.enqueue(keys)
    assert torch.equal(branch.queue[:4], torch.cat([keys, keys + 10]))  # rank 0's keys, then rank 1's
    assert int(branch.queue_ptr) == 4


def model() -> MocoExperts:
    cfg = MocoConfig(dim=8, hidden=16, queue_size=6, momentum=0.99)
    return MocoExperts(MultiExpertNet(backbone="digitsnet", in_channels=1, num_classes=10, num_experts=2), cfg)


def test_key_encoder_is_frozen_and_outside_the_trainable_parameters() -> None:
    net = model()
    frozen = [p for b in net.branches for p in [*b.key_encoder.parameters(), *b.key_proj.parameters()]]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert not {id(p) for p in frozen} & {id(p) for p in net.parameters() if p.requires_grad}


def test_forward_outputs_queue_snapshot_then_enqueues() -> None:
    torch.manual_seed(0)
    net = model().train()
    x, x_key = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    before = [b.queue.clone() for b in net.branches]
    out = net(x, x_key)
    assert len(out.queries) == len(out.keys) == len(out.queues) == 2
    for k, branch in enumerate(net.branches):
        assert torch.equal(out.queues[k], before[k])
        assert torch.allclose(out.queries[k].norm(dim=1), torch.ones(4))
        assert torch.allclose(out.queries[k], F.normalize(branch.proj(out.features[k]), dim=1))
        assert out.queries[k].requires_grad and not out.keys[k].requires_grad
        assert torch.equal(branch.queue[:4], out.keys[k]) and torch.equal(branch.queue[4:], before[k][4:])
    out.queries[0].sum().backward()  # the query path reaches the expert, the key path does not
    assert net.net.experts[0].stem[0].weight.grad is not None
    assert all(p.grad is None for p in net.branches[0].key_encoder.parameters())


def test_no_moco_outputs_in_eval_or_without_key_view() -> None:
    net = model()
    x = torch.randn(2, 1, 8, 8)
    assert net.train()(x).queries is None
    out = net.eval()(x, x)
    assert out.queries is None and out.keys is None and out.queues is None
    assert int(net.branches[0].queue_ptr) == 0
