"""Behaviours of rayexperts.models.heads and rayexperts.models.router that the mutation run (jobs/mutation_score.py) found untested.

Each test asserts what a user relies on (a value computed by hand, a gradient that must or must not flow,
a shape, a device), not the text of the mutant that revealed the gap. Fast: no Ray, CPU only.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayexperts.models import ModelOutput
from rayexperts.models.router import ExpertRouter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ RIDE's router

class FakeExperts(nn.Module):
    """E experts with a BatchNorm (to see its mode), features ``[B, d]`` and logits ``[B, C]`` from fixed weights."""

    def __init__(self, num_experts: int = 3, dim: int = 4, num_classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_experts, self.feature_dim = num_experts, dim
        self.bn = nn.BatchNorm1d(dim)
        self.bodies = nn.ModuleList(nn.Linear(6, dim) for _ in range(num_experts))
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_experts))
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        features = [self.bn(body(x)) for body in self.bodies]
        return ModelOutput(features, [head(v) for head, v in zip(self.heads, features)])


def hand_router(router: ExpertRouter, x: torch.Tensor):
    """RIDE's routing written out sample by sample (docs/methods.md §2.4)."""
    out = router.experts(x)
    z, v = [t.detach() for t in out.logits], [t.detach() for t in out.features]
    num = len(z)
    router_logits, routed, used = [], [], []
    for b in range(x.shape[0]):
        row = []
        for i in range(num - 1):
            mean = sum(z[k][b] for k in range(i + 1)) / (i + 1)
            top = torch.sort(mean, descending=True).values[: router.top_choices]
            proj = router.projections[i]
            seen = torch.relu(proj.weight @ (v[i][b] / v[i][b].norm()) + proj.bias)
            row.append((router.decide.weight[0] @ torch.cat([top, seen]) + router.decide.bias[0]).item())
        ran = [0]
        for i in range(1, num):
            if all(row[j] > 0 for j in range(i)):
                ran.append(i)
        router_logits.append(row)
        routed.append(sum(z[k][b] for k in ran) / len(ran))
        used.append(float(len(ran)))
    return torch.tensor(router_logits), torch.stack(routed), torch.tensor(used)


def test_router_layers_follow_the_number_of_experts_and_classes():
    """E − 1 projections ``d → hidden`` and one shared decision layer on ``hidden + min(k, C)`` inputs."""
    router = ExpertRouter(FakeExperts(num_experts=3, dim=4, num_classes=5), top_choices=30, hidden=7)
    assert router.top_choices == 5 and router.num_experts == 3 and router.feature_dim == 4
    assert [(p.in_features, p.out_features) for p in router.projections] == [(4, 7), (4, 7)]
    assert (router.decide.in_features, router.decide.out_features) == (7 + 5, 1)
    assert router.heads is router.experts.heads
    small = ExpertRouter(FakeExperts(num_experts=2, num_classes=5), top_choices=3, hidden=2)
    assert small.top_choices == 3 and len(small.projections) == 1 and small.decide.in_features == 5


def test_router_freezes_the_experts_and_keeps_their_batchnorm_in_eval_mode():
    """Only the routers train: the experts' weights need no gradient and their BatchNorm stays in eval mode."""
    router = ExpertRouter(FakeExperts())
    assert not any(p.requires_grad for p in router.experts.parameters())
    assert all(p.requires_grad for n, p in router.named_parameters() if not n.startswith("experts."))
    assert router.train() is router
    assert router.training and router.projections.training and not router.experts.training and not router.experts.bn.training
    router.eval()
    assert not router.training and not router.experts.training


def assert_routes_by_hand(router, x, out):
    """``out`` (the router's output on ``x``) equals :func:`hand_router`'s; its router logits and experts used."""
    logits, routed, used = hand_router(router, x)
    torch.testing.assert_close(out.router_logits, logits)
    torch.testing.assert_close(out.routed_logits, routed)
    torch.testing.assert_close(out.experts_used, used)
    return logits, used


def test_router_forward_is_rides_routing_by_hand():
    """Router i sees the top-k of the running mean logits of experts 0..i and relu(W_i v_i/|v_i|); expert i + 1 runs
    while every router so far says yes (logit > 0); the prediction is the mean logits of the experts that ran."""
    torch.manual_seed(0)
    router = ExpertRouter(FakeExperts(num_experts=3, num_classes=5, seed=1), top_choices=3, hidden=4).eval()
    with torch.no_grad():
        router.decide.bias.fill_(0.1)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    out = router(x)
    logits, used = assert_routes_by_hand(router, x, out)
    assert set(used.tolist()) == {1.0, 2.0, 3.0}  # the case covers every number of experts,
    assert ((logits[:, 0] <= 0) & (logits[:, 1] > 0)).any()  # and router 1 saying yes after router 0 said no
    assert out.router_logits.shape == (64, 2) and len(out.expert.logits) == 3


def test_router_gradient_reaches_the_routers_only():
    """A loss on the router logits trains the projections and the decision layer, never the experts."""
    router = ExpertRouter(FakeExperts(num_experts=3, num_classes=5), top_choices=3, hidden=4).train()
    out = router(torch.randn(8, 6))
    out.router_logits.sum().backward()
    assert all(p.grad is None for p in router.experts.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.decide.parameters())
    assert all(p.grad is not None for p in router.projections.parameters())


def test_router_defaults_are_rides():
    """RIDE's router sees the top 30 mean logits and projects each feature to 16 dimensions."""
    router = ExpertRouter(FakeExperts(num_experts=3, dim=4, num_classes=40))
    assert router.top_choices == 30 and [p.out_features for p in router.projections] == [16, 16]
    assert router.decide.in_features == 30 + 16


def test_router_on_two_experts_by_hand():
    """With two experts there is one router: expert 1 runs where its logit says so."""
    torch.manual_seed(3)
    router = ExpertRouter(FakeExperts(num_experts=2, num_classes=5, seed=4), top_choices=2, hidden=3).eval()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(5))
    out = router(x)
    assert_routes_by_hand(router, x, out)


def test_a_router_logit_of_zero_does_not_run_the_next_expert():
    """The next expert runs when sigmoid(logit) > 0.5; at exactly 0.5 (logit 0) it does not."""
    router = ExpertRouter(FakeExperts(num_experts=3, num_classes=5), top_choices=3, hidden=4).eval()
    with torch.no_grad():
        router.decide.weight.zero_()
        router.decide.bias.zero_()
    x = torch.randn(4, 6)
    out = router(x)
    assert torch.equal(out.router_logits, torch.zeros(4, 2))
    assert out.experts_used.tolist() == [1.0] * 4
    torch.testing.assert_close(out.routed_logits, out.expert.logits[0])


def test_cosine_classifier_describes_itself():
    """``print(model)`` shows a cosine head's input width, classes, scale and whether it has a bias."""
    from rayexperts.models.heads import CosineClassifier

    assert repr(CosineClassifier(8, 3, scale=30.0)) == "CosineClassifier(in_features=8, num_classes=3, scale=30.0, bias=False)"
    assert CosineClassifier(4, 5, bias=True).extra_repr() == "in_features=4, num_classes=5, scale=16.0, bias=True"


def test_a_cosine_classifier_has_scale_16_by_default():
    """``build_classifier("cosine", ...)`` without a scale: s = 16 (the config's ``model.cosine_scale`` default)."""
    from rayexperts.config import load_config
    from rayexperts.models.heads import build_classifier

    head = build_classifier("cosine", 4, 3)
    assert head.scale == 16.0 == float(load_config(None, []).model.cosine_scale)


def test_cosine_heads_initialise_as_their_sources_do():
    """``cosine``: unit rows of N(0, 1) draws; ``normed_linear`` (LDAM-DRW's / RIDE's NormedLinear): unit rows of
    uniform(-1, 1) draws; the same generator state gives exactly those weights."""
    import torch.nn.functional as F

    from rayexperts.models.heads import CosineClassifier, build_classifier

    torch.manual_seed(5)
    expected_normal = F.normalize(torch.randn(3, 4), dim=1)
    torch.manual_seed(5)
    expected_uniform = F.normalize(torch.empty(3, 4).uniform_(-1, 1), dim=1)
    for make, expected in ((lambda: build_classifier("cosine", 4, 3), expected_normal),
                           (lambda: CosineClassifier(4, 3), expected_normal),
                           (lambda: build_classifier("normed_linear", 4, 3), expected_uniform)):
        torch.manual_seed(5)
        torch.testing.assert_close(make().weight.detach(), expected, rtol=0, atol=0)


def test_a_cosine_heads_bias_is_added_to_the_scaled_cosine():
    """``z = γ·cos(v, w_j) + b_j`` once the bias has been trained away from 0."""
    from rayexperts.models.heads import CosineClassifier

    head = CosineClassifier(2, 2, scale=10.0, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.bias.copy_(torch.tensor([0.5, -2.0]))
    z = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(z, torch.tensor([[10 * 0.6 + 0.5, 10 * 0.8 - 2.0]]))


def test_a_cosine_head_has_no_bias_unless_asked_and_names_a_wrong_init():
    from rayexperts.models.heads import CosineClassifier, build_classifier

    assert build_classifier("cosine", 4, 3).bias is None and build_classifier("normed_linear", 4, 3).bias is None
    assert build_classifier("cosine", 4, 3, bias=True).bias is not None
    with pytest.raises(ValueError, match="unknown cosine classifier init 'xavier'"):
        CosineClassifier(4, 3, init="xavier")
