"""Part G, memory (GPU finding F6): the device-cache plan against ``torch.cuda.mem_get_info`` (for 1 and 4
processes sharing the GPU), and the peak memory of every part run before it."""

from __future__ import annotations

import pytest
import torch

from rayexperts.data import build_dataset
from rayexperts.data.device import plan_cache
from rayexperts.diagnostics.runs import run_config

pytestmark = pytest.mark.gpu


def test_cache_plan(setup, note):
    cfg = run_config(setup, "ce")
    data = build_dataset(cfg.data)
    limit = float(cfg.data.cache_limit_mb)
    if not setup.cuda:
        plan = plan_cache(data, "auto", limit)
        note.info("cache_plan.cpu", mode=plan.mode, why=plan.why)
        assert plan.mode in ("device", "host", "off")
        return
    free, total = torch.cuda.mem_get_info(setup.device)
    modes = {}
    for sharing in (1, 4):
        plan = plan_cache(data, "auto", limit, device=setup.device, sharing=sharing)
        modes[sharing] = plan.mode
        note.info(f"cache_plan.sharing{sharing}", mode=plan.mode, mb=plan.megabytes, why=plan.why)
    note.info("mem_get_info", free_mb=free / 2**20, total_mb=total / 2**20)
    order = ["off", "host", "device"]  # sharing the GPU never asks for a bigger cache
    assert order.index(modes[4]) <= order.index(modes[1])


def test_peak_memory_per_part(cuda, note):
    peaks = {p: v["peak_mb"] for p, v in cuda.parts.items() if v.get("peak_mb") is not None}
    note.info("peak_mb_per_part", **peaks)
    assert all(mb >= 0 for mb in peaks.values())
