"""Connect to a Ray cluster, or start a local one; never hang on an address nobody answers.

* ``RAY_ADDRESS`` set (``ray job submit`` sets it for the job's driver): connect to that cluster.
  Its GCS port is tried first: an address nothing answers at is an error within
  :data:`CONNECT_TIMEOUT_S` seconds that names it, instead of Ray's minutes of retries.
* No ``RAY_ADDRESS``: start a new local instance (``address="local"``), even when a ``ray start``
  that died left its address file behind.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rayexperts import registry
from rayexperts.errors import InputError
from rayexperts.trace import mark

CONNECT_TIMEOUT_S = float(os.environ.get("RAYEXPERTS_CONNECT_TIMEOUT_S", "30"))  # how long RAY_ADDRESS may stay silent


class ClusterUnreachable(InputError, ConnectionError):
    """``RAY_ADDRESS`` names a cluster that does not answer; the message names the address."""


def dashboard_wanted(setting: str, ray_train: bool) -> bool:
    """``run.dashboard`` for a local instance: ``on``, ``off``, or ``auto``: on when the job runs Ray Train,
    whose PlacementGroupCleaner frees a killed run's CPUs through the dashboard's state API."""
    return setting == "on" or (setting == "auto" and ray_train)


def ensure_ray(*, dashboard: bool, num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (a submitted job's, or one you set), else start a local one,
    with Ray's dashboard when ``dashboard`` (:func:`dashboard_wanted`)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        connect(address)
    else:
        start_local_ray(num_cpus, dashboard=dashboard)
    mark("ray ready")


def gcs_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` GCS address; None for ``ray://`` client addresses."""
    if address.startswith("ray://"):
        return None
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"RAY_ADDRESS={address} is a dashboard (job submission) address; a driver connects to the "
            "cluster's GCS address, HEAD:6379 (or unset RAY_ADDRESS to start a local instance)"
        )
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as e:
            found, why = None, f" ({e})"
        else:
            why = ""
        if not found:
            raise ClusterUnreachable(f"RAY_ADDRESS=auto: no running Ray cluster found on this machine{why}")
        address = found
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"RAY_ADDRESS={address!r} is not of the form HOST:PORT")
    return host, int(port)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once a TCP connection to ``host:port`` succeeds within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)


def connect(address: str, timeout: float | None = None) -> None:
    """``ray.init(address)`` once the address answers; :class:`ClusterUnreachable` within ``timeout`` if not."""
    import ray

    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    found = gcs_address(address)
    if found is not None and not wait_for_port(*found, timeout=timeout):
        raise ClusterUnreachable(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} (nothing answered at {found[0]}:{found[1]} "
            f"within {timeout:.0f} s): start it with `ray start --head`, fix RAY_ADDRESS, or unset it to run on a "
            "local instance"
        )
    ray.init(address=address, log_to_driver=True)


def start_local_ray(num_cpus: int | None = None, *, dashboard: bool) -> None:
    """Start a new local Ray instance whose workers import this copy of rayexperts and can find its state API.

    ``address="local"``: never an existing (or dead) cluster from an address file. This package's parent
    folder goes first on the workers' ``PYTHONPATH``, so workers import the same rayexperts as this driver
    even when it runs uninstalled from another working directory. With ``dashboard``, its port is chosen
    here and exported as ``RAY_API_SERVER_ADDRESS`` before Ray starts, so every process of the instance
    inherits it: without it, Ray Train's PlacementGroupCleaner (which frees a run's CPUs when its
    controller is killed, e.g. a trial that ASHA stops) fails whenever another Ray instance runs on the
    same machine. Without the dashboard there is no state API (one-worker runs need none).
    """
    import ray

    import rayexperts

    root = str(Path(rayexperts.__file__).resolve().parents[1])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p != root]])
    port = None
    if dashboard:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # No machine of a local instance is pre-empted: Ray Train's pre-emption watcher (an extra actor for
    # every run) has nothing to watch.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, dashboard_port=port, include_dashboard=dashboard)


def ship_plugins() -> dict[str, Any]:
    """This process's plugins, ready to send to Ray workers (:func:`rayexperts.registry.ship`; each worker
    registers them with :func:`rayexperts.registry.load_plugins`). The entries a script registered itself
    may come from a module the workers cannot import (a test file, ``__main__``): those modules are pickled
    by value."""
    from ray import cloudpickle

    found = registry.ship()
    for entries in found["entries"].values():
        for obj in entries.values():
            module = sys.modules.get(getattr(obj, "__module__", "") or "")
            if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("rayexperts."):
                cloudpickle.register_pickle_by_value(module)
    return found
