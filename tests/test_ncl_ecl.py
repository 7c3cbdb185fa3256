"""NCL and ECL (docs/methods.md "NCL", "ECL"; issue 4): each total against the paper's formula assembled
from ``rayexperts.losses``, the ablation switches, the shared hard set, the BKT head pairing, and a
one-epoch digits-lt run with its MoCo queues."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rayexperts import losses as L
from rayexperts.config import load_config
from rayexperts.methods.ecl import REF, EffectiveCollaborative
from rayexperts.methods.ncl import NestedCollaborative
from rayexperts.models import ContrastiveOutput

K, B, C, D, Q = 3, 6, 5, 4, 7
COUNTS = torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0])
TARGETS = torch.tensor([0, 1, 2, 3, 4, 2])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a.item(), b.item())


def fake_output(seed: int = 0, ref: bool = False) -> ContrastiveOutput:
    """A hand-made model output: K experts' features/logits (+ ref heads) and MoCo queries/keys/queues."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> list[torch.Tensor]:
        return [F.normalize(torch.randn(*shape, generator=g), dim=1) for _ in range(K)]

    return ContrastiveOutput(
        features=[torch.randn(B, D, generator=g) for _ in range(K)],
        logits=[3 * torch.randn(B, C, generator=g) for _ in range(K)],
        aux={REF: [3 * torch.randn(B, C, generator=g) for _ in range(K)]} if ref else {},
        queries=unit(B, D),
        keys=unit(B, D),
        queues=unit(Q, D),
    )


def info_nce_sum(out: ContrastiveOutput, temperature: float) -> torch.Tensor:
    return sum(L.info_nce_loss(q, k, n, temperature) for q, k, n in zip(out.queries, out.keys, out.queues))


# ---------------------------------------------------------------------------------- NCL

LAMBDA, HARD_RATIO, TEMP = 0.35, 0.4, 0.3  # C_hard = round(0.4 · 5) = 2


def ncl(**loss: object) -> NestedCollaborative:
    overrides = ["method=ncl", "data.name=digits-lt", f"ncl.distill_weight={LAMBDA}", f"ncl.hard_ratio={HARD_RATIO}",
                 f"ncl.moco.temperature={TEMP}"] + [f"ncl.{k}={v}" for k, v in loss.items()]
    return NestedCollaborative(load_config(None, overrides), COUNTS)


def ncl_parts(out: ContrastiveOutput, anchor: int = 0, mode: str = "restrict") -> dict[str, torch.Tensor]:
    """Every NCL piece from the loss functions: L_nil^all, L_nil^hard, BOD_all, BOD_hard, L_con."""
    mask = L.hard_category_mask(out.logits[anchor], TARGETS, 2)
    nil_all = L.nil_loss(out.logits, TARGETS, COUNTS, None, hard=False)
    return {
        "nil_all": nil_all,
        "nil_hard": L.nil_loss(out.logits, TARGETS, COUNTS, mask, mode=mode) - nil_all,
        "bod_all": L.nbod_loss(out.logits, COUNTS, mask, bod_hard=False, mode=mode),
        "bod_hard": L.nbod_loss(out.logits, COUNTS, mask, bod_all=False, mode=mode),
        "con": info_nce_sum(out, TEMP),
    }


@pytest.mark.parametrize("mode", ["restrict", "mask"])
def test_ncl_total_is_eq12(mode: str) -> None:
    out, method = fake_output(), ncl(hard_mode=mode)
    p = ncl_parts(out, mode=mode)
    res = method.loss(out, TARGETS)
    close(res.total, p["nil_all"] + p["nil_hard"] + p["con"] + LAMBDA * (p["bod_all"] + p["bod_hard"]))
    close(res.terms["nil"], p["nil_all"] + p["nil_hard"])
    close(res.terms["dis"], LAMBDA * (p["bod_all"] + p["bod_hard"]))
    close(res.terms["con"], p["con"])
    close(res.total, sum(res.terms.values()))
    assert method.num_hard == 2 and method.uses_key_view and method.primary_view == "ensemble"


@pytest.mark.parametrize(
    "switch, removed",
    [("learn_hard", ["nil_hard"]), ("contrastive", ["con"]), ("distill_all", ["bod_all"]),
     ("distill_hard", ["bod_hard"])],
)
def test_ncl_switch_removes_exactly_its_term(switch: str, removed: list[str]) -> None:
    out = fake_output(1)
    p = ncl_parts(out)
    weight = {"nil_all": 1.0, "nil_hard": 1.0, "con": 1.0, "bod_all": LAMBDA, "bod_hard": LAMBDA}
    full = ncl().loss(out, TARGETS)
    res = ncl(**{switch: False}).loss(out, TARGETS)
    close(res.total, full.total - sum(weight[r] * p[r] for r in removed))
    close(res.total, sum(res.terms.values()))
    if switch == "contrastive":
        assert "con" not in res.terms and not ncl(contrastive=False).uses_key_view


def test_ncl_all_distillation_off_drops_the_dis_term() -> None:
    out = fake_output(2)
    p = ncl_parts(out)
    res = ncl(distill_all=False, distill_hard=False).loss(out, TARGETS)
    assert set(res.terms) == {"nil", "con"}
    close(res.total, p["nil_all"] + p["nil_hard"] + p["con"])


def ncl_total(out: ContrastiveOutput, anchor: int) -> torch.Tensor:
    """Eq. 12 with one hard set, mined from expert ``anchor``'s raw logits, for every expert."""
    p = ncl_parts(out, anchor=anchor)
    return p["nil_all"] + p["nil_hard"] + p["con"] + LAMBDA * (p["bod_all"] + p["bod_hard"])


def test_ncl_hard_set_is_mined_once_from_the_anchor_raw_logits() -> None:
    out = fake_output(3)
    res = ncl(anchor_expert=2).loss(out, TARGETS)
    close(res.total, ncl_total(out, anchor=2))
    assert not torch.allclose(res.total, ncl_total(out, anchor=0))
    # not the balanced logits z + log n: a mask mined from them gives another value
    mask_b = L.hard_category_mask(out.logits[2] + COUNTS.log(), TARGETS, 2)
    assert not torch.equal(mask_b, L.hard_category_mask(out.logits[2], TARGETS, 2))
    wrong = (L.nil_loss(out.logits, TARGETS, COUNTS, mask_b) + info_nce_sum(out, TEMP)
             + LAMBDA * L.nbod_loss(out.logits, COUNTS, mask_b))
    assert not torch.allclose(res.total, wrong)


def test_ncl_random_anchor_draws_an_expert_per_step() -> None:
    out = fake_output(4)
    per_anchor = [ncl_total(out, anchor=k) for k in range(K)]
    assert all(not torch.allclose(per_anchor[a], per_anchor[b]) for a in range(K) for b in range(a))
    method = ncl(hard_anchor="random")
    torch.manual_seed(0)
    picked = set()
    for _ in range(30):
        total = method.loss(out, TARGETS).total
        picked |= {k for k in range(K) if torch.allclose(total, per_anchor[k], rtol=1e-5, atol=1e-6)}
    assert picked == set(range(K))


def test_ncl_rejects_an_anchor_outside_the_experts() -> None:
    with pytest.raises(ValueError, match="anchor_expert"):
        ncl(anchor_expert=3)


# ---------------------------------------------------------------------------------- ECL

ALPHA, BETA, KD_TAU, BC_TAU = 0.45, 0.7, 2.0, 1.2


def ecl(**loss: object) -> EffectiveCollaborative:
    overrides = ["method=ecl", "data.name=digits-lt", f"ecl.distill_weight={ALPHA}", f"ecl.contrastive_weight={BETA}",
                 f"ecl.distill_temperature={KD_TAU}", f"ecl.tau={BC_TAU}", f"ecl.moco.temperature={TEMP}"]
    return EffectiveCollaborative(load_config(None, overrides + [f"ecl.{k}={v}" for k, v in loss.items()]), COUNTS)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p) ‖ softmax(q))``."""
    return (p_logits.softmax(-1) * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)


def ecl_parts(out: ContrastiveOutput) -> dict[str, torch.Tensor]:
    """ECL eq. 7 written out pair by pair (w of the student q), eq. 8, 9, 10."""
    sup = sum(L.balanced_softmax_loss(r, TARGETS, COUNTS, BC_TAU) + L.balanced_softmax_loss(c, TARGETS, COUNTS, BC_TAU)
              for r, c in zip(out.aux[REF], out.logits)) / K
    w = [L.bkt_weights(r, c, TARGETS) for r, c in zip(out.aux[REF], out.logits)]
    pairs = [(k, q) for k in range(K) for q in range(K) if q != k]
    z = [zc / KD_TAU for zc in out.logits]
    kd_logit = sum((w[q] * KD_TAU**2 * kl(z[k], z[q])).sum() for k, q in pairs) / (B * K * (K - 1))
    kd_plain = sum((KD_TAU**2 * kl(z[k], z[q])).sum() for k, q in pairs) / (B * K * (K - 1))
    v = [f / KD_TAU for f in out.features]
    kd_feature = sum((KD_TAU**2 * kl(v[k], v[q])).mean() for k, q in pairs) / (K * (K - 1))
    return {"sup": sup, "kd_logit": kd_logit, "kd_plain": kd_plain, "kd_feature": kd_feature,
            "con": info_nce_sum(out, TEMP)}


def test_ecl_total_is_eq11() -> None:
    out, method = fake_output(5, ref=True), ecl()
    p = ecl_parts(out)
    res = method.loss(out, TARGETS)
    close(res.total, p["sup"] + ALPHA * (p["kd_logit"] + p["kd_feature"]) + BETA * p["con"])
    close(res.terms["sup"], p["sup"])
    close(res.terms["kd_logit"], ALPHA * p["kd_logit"])
    close(res.terms["kd_feature"], ALPHA * p["kd_feature"])
    close(res.terms["con"], BETA * p["con"])
    close(res.total, sum(res.terms.values()))
    assert method.uses_key_view and method.primary_view == "ensemble"


@pytest.mark.parametrize("switch, removed", [("feature_distillation", "kd_feature"), ("contrastive", "con")])
def test_ecl_switch_removes_exactly_its_term(switch: str, removed: str) -> None:
    out = fake_output(6, ref=True)
    p = ecl_parts(out)
    weight = {"kd_feature": ALPHA, "con": BETA}
    res = ecl(**{switch: False}).loss(out, TARGETS)
    assert removed not in res.terms
    close(res.total, ecl().loss(out, TARGETS).total - weight[removed] * p[removed])
    close(res.total, sum(res.terms.values()))
    if switch == "contrastive":
        assert not ecl(contrastive=False).uses_key_view


def test_ecl_without_bkt_distils_with_unit_weights() -> None:
    out = fake_output(7, ref=True)
    p = ecl_parts(out)
    res = ecl(balanced_transfer=False).loss(out, TARGETS)
    close(res.terms["kd_logit"], ALPHA * p["kd_plain"])
    close(res.total, p["sup"] + ALPHA * (p["kd_plain"] + p["kd_feature"]) + BETA * p["con"])
    assert not torch.allclose(p["kd_plain"], p["kd_logit"])


def test_ecl_bkt_weights_come_from_each_experts_own_ref_and_cls_heads() -> None:
    out = fake_output(8, ref=True)
    # expert 1: cls head less confident than its ref head on samples 0-2, more confident on 3-5
    y = TARGETS
    one_hot = F.one_hot(y, C).float()
    out.aux[REF][1] = 4.0 * one_hot + 0.1 * torch.arange(C).float()
    out.logits[1] = torch.where(torch.arange(B).unsqueeze(1) < 3, 1.0, 8.0) * one_hot + 0.1 * torch.arange(C).float()
    w1 = L.bkt_weights(out.aux[REF][1], out.logits[1], y)
    assert (w1[:3] > 1).all() and (w1[3:] < 1).all()
    res = ecl().loss(out, TARGETS)
    close(res.terms["kd_logit"], ALPHA * ecl_parts(out)["kd_logit"])  # pair (k, q) weighted by the student q's w
    # weighting each pair by the teacher k's heads instead gives another value
    w = [L.bkt_weights(r, c, y) for r, c in zip(out.aux[REF], out.logits)]
    z = [zc / KD_TAU for zc in out.logits]
    by_teacher = sum((w[k] * KD_TAU**2 * kl(z[k], z[q])).sum() for k in range(K) for q in range(K) if q != k)
    assert not torch.allclose(res.terms["kd_logit"], ALPHA * by_teacher / (B * K * (K - 1)))


# ------------------------------------------------------------------- one epoch on digits-lt

@pytest.mark.slow
@pytest.mark.parametrize("method", ["ncl", "ecl"])
def test_one_epoch_on_digits_reports_all_views_and_updates_the_queues_fifo(method: str) -> None:
    from rayexperts.engine.run import Run
    from rayexperts.engine.loop import evaluate_splits, train_epoch
    from rayexperts.engine.results import result_rows
    from rayexperts.methods.base import Batch

    queue, batch = 200, 128  # 4 steps: the pointer ends at 512 % 200 = 112, the next batch wraps
    overrides = [f"method={method}", "data.name=digits-lt", "train.epochs=1", f"{method}.moco.queue_size={queue}",
                 f"train.batch_size={batch}", "run.verbose=false"]
    run = Run(load_config(None, overrides))
    branches = list(run.model.branches)
    before = [b.queue.clone() for b in branches]
    stats = train_epoch(run, 0)
    rows, classes = result_rows(run, 0, evaluate_splits(run), stats)

    assert [r["view"] for r in rows] == ["expert0", "expert1", "expert2", "ensemble"]
    assert set(classes["view"]) == {"expert0", "expert1", "expert2", "ensemble"}
    loss_keys = [k for k in rows[0] if k.startswith("loss")]
    assert "loss" in loss_keys and "loss_con" in loss_keys
    assert all(math.isfinite(r[k]) for r in rows for k in loss_keys)
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)

    steps = len(run.train_loader)
    for b, old in zip(branches, before):
        assert not torch.equal(b.queue, old)
        assert int(b.queue_ptr) == steps * batch % queue

    # one more step: the queue is the pre-step snapshot with this batch's keys written FIFO at the pointer
    x, x_key, y = next(iter(run.train_loader))
    ptrs = [int(b.queue_ptr) for b in branches]
    run.model.train()
    out = run.method.forward(run.model, Batch(x, y, key_images=x_key))
    for b, ptr, keys, snapshot in zip(branches, ptrs, out.keys, out.queues):
        expected = snapshot.clone()
        expected[(ptr + torch.arange(batch)) % queue] = keys
        assert torch.equal(b.queue, expected)
