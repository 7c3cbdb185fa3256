"""NCL and ECL (METHODS.md "NCL", "ECL"; issue 4): each total against the paper's formula assembled
from ``rayexperts.losses``, the ablation switches, the shared hard set, the BKT head pairing, and a
one-epoch digits-lt run with its MoCo queues."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rayexperts.methods.ecl as ecl_module
import rayexperts.methods.ncl as ncl_module
from rayexperts import losses as L
from rayexperts.config import load_config
from rayexperts.methods.ecl import EffectiveCollaborative
from rayexperts.methods.ncl import NestedCollaborative
from rayexperts.models.output import ModelOutput

K, B, C, D, Q = 3, 6, 5, 4, 7
COUNTS = torch.tensor([50.0, 20.0, 10.0, 5.0, 2.0])
TARGETS = torch.tensor([0, 1, 2, 3, 4, 2])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a.item(), b.item())


def fake_output(seed: int = 0, ref: bool = False) -> ModelOutput:
    """A hand-made ModelOutput: K experts' features/logits (+ ref heads) and MoCo queries/keys/queues."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> list[torch.Tensor]:
        return [F.normalize(torch.randn(*shape, generator=g), dim=1) for _ in range(K)]

    return ModelOutput(
        features=[torch.randn(B, D, generator=g) for _ in range(K)],
        logits=[3 * torch.randn(B, C, generator=g) for _ in range(K)],
        ref_logits=[3 * torch.randn(B, C, generator=g) for _ in range(K)] if ref else None,
        queries=unit(B, D),
        keys=unit(B, D),
        queues=unit(Q, D),
    )


def info_nce_sum(out: ModelOutput, temperature: float) -> torch.Tensor:
    return sum(L.info_nce_loss(q, k, n, temperature) for q, k, n in zip(out.queries, out.keys, out.queues))


# ---------------------------------------------------------------------------------- NCL

LAMBDA, HARD_RATIO, TEMP = 0.35, 0.4, 0.3  # C_hard = round(0.4 · 5) = 2


def ncl(**loss: object) -> NestedCollaborative:
    overrides = ["method=ncl", "data.name=digits-lt", f"loss.ncl_lambda={LAMBDA}", f"loss.hard_ratio={HARD_RATIO}",
                 f"model.moco_temperature={TEMP}"] + [f"loss.{k}={v}" for k, v in loss.items()]
    return NestedCollaborative(load_config(None, overrides), COUNTS)


def ncl_parts(out: ModelOutput, anchor: int = 0, mode: str = "restrict") -> dict[str, torch.Tensor]:
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
    [("nil_hard", ["nil_hard"]), ("self_sup", ["con"]), ("bod_all", ["bod_all"]), ("bod_hard", ["bod_hard"])],
)
def test_ncl_switch_removes_exactly_its_term(switch: str, removed: list[str]) -> None:
    out = fake_output(1)
    p = ncl_parts(out)
    weight = {"nil_all": 1.0, "nil_hard": 1.0, "con": 1.0, "bod_all": LAMBDA, "bod_hard": LAMBDA}
    full = ncl().loss(out, TARGETS)
    res = ncl(**{switch: False}).loss(out, TARGETS)
    close(res.total, full.total - sum(weight[r] * p[r] for r in removed))
    close(res.total, sum(res.terms.values()))
    if switch == "self_sup":
        assert "con" not in res.terms and not ncl(self_sup=False).uses_key_view


def test_ncl_all_distillation_off_drops_the_dis_term() -> None:
    out = fake_output(2)
    p = ncl_parts(out)
    res = ncl(bod_all=False, bod_hard=False).loss(out, TARGETS)
    assert set(res.terms) == {"nil", "con"}
    close(res.total, p["nil_all"] + p["nil_hard"] + p["con"])


def spy_masks(monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """Record the anchor logits HCM sees and the masks the NIL / NBOD terms receive."""
    anchors, used = [], []
    real_mask, real_nil, real_nbod = L.hard_category_mask, L.nil_loss, L.nbod_loss

    def mask(anchor_logits, targets, num_hard):
        anchors.append(anchor_logits)
        return real_mask(anchor_logits, targets, num_hard)

    def nil(logits, targets, counts, hard_mask, *a, **kw):
        used.append(hard_mask)
        return real_nil(logits, targets, counts, hard_mask, *a, **kw)

    def nbod(logits, counts, hard_mask, *a, **kw):
        used.append(hard_mask)
        return real_nbod(logits, counts, hard_mask, *a, **kw)

    monkeypatch.setattr(ncl_module, "hard_category_mask", mask)
    monkeypatch.setattr(ncl_module, "nil_loss", nil)
    monkeypatch.setattr(ncl_module, "nbod_loss", nbod)
    return anchors, used


def test_ncl_hard_set_is_mined_once_from_the_anchor_raw_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_output(3)
    anchors, used = spy_masks(monkeypatch)
    res = ncl(anchor_expert=2).loss(out, TARGETS)
    assert len(anchors) == 1 and torch.equal(anchors[0], out.logits[2])  # raw logits, not z + log n
    assert len(used) == 2 and used[0] is used[1]  # one mask, shared by NIL and NBOD, i.e. by every expert
    p = ncl_parts(out, anchor=2)
    close(res.total, p["nil_all"] + p["nil_hard"] + p["con"] + LAMBDA * (p["bod_all"] + p["bod_hard"]))
    assert not torch.allclose(res.total, ncl(anchor_expert=0).loss(out, TARGETS).total)


def test_ncl_random_anchor_draws_an_expert_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_output(4)
    anchors, _ = spy_masks(monkeypatch)
    method = ncl(hard_anchor="random")
    torch.manual_seed(0)
    for _ in range(30):
        method.loss(out, TARGETS)
    picked = {next(k for k in range(K) if torch.equal(a, out.logits[k])) for a in anchors}
    assert picked == set(range(K))


def test_ncl_rejects_an_anchor_outside_the_experts() -> None:
    with pytest.raises(ValueError, match="anchor_expert"):
        ncl(anchor_expert=3)


# ---------------------------------------------------------------------------------- ECL

ALPHA, BETA, KD_TAU, BC_TAU = 0.45, 0.7, 2.0, 1.2


def ecl(**loss: object) -> EffectiveCollaborative:
    overrides = ["method=ecl", "data.name=digits-lt", f"loss.ecl_alpha={ALPHA}", f"loss.ecl_beta={BETA}",
                 f"loss.kd_tau={KD_TAU}", f"loss.tau={BC_TAU}", f"model.moco_temperature={TEMP}"]
    return EffectiveCollaborative(load_config(None, overrides + [f"loss.{k}={v}" for k, v in loss.items()]), COUNTS)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(p) ‖ softmax(q))``."""
    return (p_logits.softmax(-1) * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)


def ecl_parts(out: ModelOutput) -> dict[str, torch.Tensor]:
    """ECL eq. 7 written out pair by pair (w of the student q), eq. 8, 9, 10."""
    sup = sum(L.balanced_softmax_loss(r, TARGETS, COUNTS, BC_TAU) + L.balanced_softmax_loss(c, TARGETS, COUNTS, BC_TAU)
              for r, c in zip(out.ref_logits, out.logits)) / K
    w = [L.bkt_weights(r, c, TARGETS) for r, c in zip(out.ref_logits, out.logits)]
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


@pytest.mark.parametrize("switch, removed", [("fld", "kd_feature"), ("cpt", "con")])
def test_ecl_switch_removes_exactly_its_term(switch: str, removed: str) -> None:
    out = fake_output(6, ref=True)
    p = ecl_parts(out)
    weight = {"kd_feature": ALPHA, "con": BETA}
    res = ecl(**{switch: False}).loss(out, TARGETS)
    assert removed not in res.terms
    close(res.total, ecl().loss(out, TARGETS).total - weight[removed] * p[removed])
    close(res.total, sum(res.terms.values()))
    if switch == "cpt":
        assert not ecl(cpt=False).uses_key_view


def test_ecl_without_bkt_distils_with_unit_weights() -> None:
    out = fake_output(7, ref=True)
    p = ecl_parts(out)
    res = ecl(bkt=False).loss(out, TARGETS)
    close(res.terms["kd_logit"], ALPHA * p["kd_plain"])
    close(res.total, p["sup"] + ALPHA * (p["kd_plain"] + p["kd_feature"]) + BETA * p["con"])
    assert not torch.allclose(p["kd_plain"], p["kd_logit"])


def test_ecl_bkt_weights_come_from_each_experts_own_ref_and_cls_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    out = fake_output(8, ref=True)
    # expert 1: cls head less confident than its ref head on samples 0-2, more confident on 3-5
    y = TARGETS
    one_hot = F.one_hot(y, C).float()
    out.ref_logits[1] = 4.0 * one_hot + 0.1 * torch.arange(C).float()
    out.logits[1] = torch.where(torch.arange(B).unsqueeze(1) < 3, 1.0, 8.0) * one_hot + 0.1 * torch.arange(C).float()
    seen = []
    real = L.logit_kd_loss
    monkeypatch.setattr(ecl_module, "logit_kd_loss", lambda z, w, tau: seen.append(w) or real(z, w, tau=tau))
    ecl().loss(out, TARGETS)
    (w,) = seen
    assert w.shape == (K, B) and not w.requires_grad
    for q in range(K):
        close(w[q], L.bkt_weights(out.ref_logits[q], out.logits[q], y))
    assert (w[1, :3] > 1).all() and (w[1, 3:] < 1).all()


# ------------------------------------------------------------------- one epoch on digits-lt

@pytest.mark.slow
@pytest.mark.parametrize("method", ["ncl", "ecl"])
def test_one_epoch_on_digits_reports_all_views_and_updates_the_queues_fifo(method: str) -> None:
    from rayexperts.engine.worker import Run
    from rayexperts.methods.base import Batch

    queue, batch = 200, 128  # 4 steps: the pointer ends at 512 % 200 = 112, the next batch wraps
    overrides = [f"method={method}", "data.name=digits-lt", "train.epochs=1", f"model.moco_queue={queue}",
                 f"train.batch_size={batch}", "run.verbose=false"]
    run = Run(load_config(None, overrides))
    branches = list(run.model.moco)
    before = [b.queue.clone() for b in branches]
    stats = run.train_epoch(0)
    rows, classes = run.result_rows(0, run.evaluate(), stats)

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
