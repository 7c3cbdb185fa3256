"""The dispatch census: every aten op issued from ``rayexperts/`` code under a ``TorchDispatchMode``, with the
ones that read a device value back to the host (a sync on a GPU), mixed devices, host-device copies and the
dtypes the loss ops get (docs/gpu.md, findings F2, F3, F8, F15)."""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rayexperts

PKG = str(rayexperts.PACKAGE_DIR) + "/"

# Ops that read a device value back to the host (each a sync on a GPU): .item()/float()/bool()
# (_local_scalar_dense), nonzero and the boolean-mask index/index_put_ built on it, bincount (sizes its
# output from the input's maximum), and the other ops whose output shape depends on the data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "bincount", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
Site = tuple[str, str, str, int]  # (op, file under the root, function, line)
Budget = dict[tuple[str, str], tuple[int, str]]  # (op, file) -> (calls allowed, why and where)

# The ops whose input dtype decides a loss's precision (finding F8: float32 under autocast).
LOSS_OPS = {"_log_softmax", "_softmax", "nll_loss_forward", "nll_loss2d_forward", "kl_div", "logsumexp",
            "binary_cross_entropy_with_logits", "log_sigmoid_forward", "mse_loss", "smooth_l1_loss", "huber_loss"}

# The budget: (op, file under rayexperts/) -> (calls allowed per training step / evaluation batch, why and where).
# Empty: no sync is unavoidable today (F3 removed evaluation's bincounts). An entry needs its reason and line.
TRAIN_BUDGET: Budget = {}
EVAL_BUDGET: Budget = {}

# Host-side work, which the census cannot tell from device work on a CPU (there every tensor is a CPU tensor):
# (op, file under rayexperts/, function) -> why it is no sync on a GPU either. Exempt at any count.
HOST_SIDE: dict[tuple[str, str, str], str] = {
    ("bincount", "data/augment/batched/core.py", "rows_by_group"):
        "the sizes of the augmentation groups drawn on the CPU (BatchRng.rand_cpu), before one copy to the device: "
        "`sizes = torch.bincount(groups.clamp(max=count), minlength=count + 1)` (a CPU tensor in a GPU run too)",
}



class Census(TorchDispatchMode):
    """Every aten op dispatched while some Python frame on the stack is in the package ``root`` (the innermost
    such frame is the op's site): all of them counted by name (``ops``), and by site the syncing ones
    (``syncs``), the ops mixing devices (``mixed``; 0-dim CPU scalars aside), host-to-device and device-to-host
    copies (``h2d``, ``d2h``) and CPU-only ops while ``device`` is a GPU (``cpu_ops``); ``loss_dtypes``
    counts the dtype of the first floating input of each loss op.

    On a GPU (``device``), an op whose tensors are all on the CPU is no sync; on a CPU nothing tells them
    apart, so :data:`HOST_SIDE` names the host-side ones."""

    def __init__(self, root: str = PKG, device: torch.device | None = None) -> None:
        super().__init__()
        self.root, self.device = root, device or torch.device("cpu")
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.mixed: Counter = Counter()
        self.h2d: Counter = Counter()
        self.d2h: Counter = Counter()
        self.cpu_ops: Counter = Counter()
        self.loss_dtypes: Counter = Counter()

    def _frame(self):
        f = sys._getframe(2)
        while f is not None and not f.f_code.co_filename.startswith(self.root):
            f = f.f_back
        return f

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = self._frame()
        if frame is not None:
            self._count(func.overloadpacket.__name__, args, kwargs,
                        (frame.f_code.co_filename[len(self.root):], frame.f_code.co_name, frame.f_lineno))
        return func(*args, **kwargs)

    def _count(self, name: str, args, kwargs, where: tuple[str, str, int]) -> None:
        self.ops[name] += 1
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_gpu = self.device.type != "cpu"
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = torch.device(args[0].device if name == "copy_" else kwargs.get("device") or src.device)
            if src.device.type == "cpu" and dst.type != "cpu":
                self.h2d[where] += 1
            elif src.device.type != "cpu" and dst.type == "cpu":
                self.d2h[where] += 1
        else:
            devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
            if len(devices) > 1:
                self.mixed[(name, *where)] += 1
            elif on_gpu and devices == {torch.device("cpu")}:
                self.cpu_ops[where] += 1
        masked = name in INDEX_OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                           for t in tree_leaves(args[1:2]))
        on_host = on_gpu and all(t.device.type == "cpu" for t in tensors)
        if (name in SYNC_OPS or masked) and not on_host:
            self.syncs[(f"{name}[bool]" if masked else name, *where)] += 1
        if name in LOSS_OPS:
            first = next((t for t in tensors if t.is_floating_point()), None)
            if first is not None:
                self.loss_dtypes[str(first.dtype).removeprefix("torch.")] += 1

    def device_syncs(self) -> Counter:
        """The syncs by site, host-side work (:data:`HOST_SIDE`) left out."""
        return Counter({k: n for k, n in self.syncs.items() if k[:3] not in HOST_SIDE})

    def over_budget(self, budget: Budget) -> dict[str, int]:
        """``"op file:line (function)": count`` of the syncs beyond ``budget`` (per op and file)."""
        device = self.device_syncs()
        per_file: Counter = Counter()
        for (op, path, _, _), n in device.items():
            per_file[(op, path)] += n
        over = {key for key, n in per_file.items() if n > budget.get(key, (0, ""))[0]}
        return {site(k): n for k, n in device.items() if k[:2] in over}


def site(key: tuple) -> str:
    """A census key as text: ``op file:line (function)``, or ``file:line (function)``."""
    *op, path, fn, line = key
    return f"{' '.join(op)} {path}:{line} ({fn})".lstrip()


def top(counter: Counter, n: int = 3) -> dict[str, int]:
    """The ``n`` most frequent sites, as text."""
    return {site(k) if isinstance(k, tuple) else str(k): c for k, c in counter.most_common(n)}
