"""Connect to a Ray cluster, or start a local one."""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from rayexperts import registry


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` / the submitting job, or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        start_local_ray(num_cpus)


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray instance whose processes can find its state API.

    The dashboard port is chosen here and exported as ``RAY_API_SERVER_ADDRESS`` before Ray
    starts, so every process of the instance inherits it. Without it, Ray Train's
    PlacementGroupCleaner (which frees a run's CPUs when its controller is killed, e.g. a trial
    that ASHA stops) fails whenever another Ray instance runs on the same machine, and the
    CPUs stay reserved.
    """
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=num_cpus, log_to_driver=True, dashboard_port=port)


def ship_plugins() -> dict[str, dict[str, Any]]:
    """The registries' plugins (methods, data sets, backbones registered outside the package), ready to
    send to Ray workers: a plugin's module may not be importable there (a test file, a user's script),
    so its module is pickled by value."""
    from ray import cloudpickle

    found = registry.plugins()
    for entries in found.values():
        for obj in entries.values():
            module = sys.modules.get(getattr(obj, "__module__", "") or "")
            if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("rayexperts."):
                cloudpickle.register_pickle_by_value(module)
    return found
