"""Connecting to Ray for `--ray local:N|auto|ADDRESS` (the optional `ray` extra).

`local:N` starts a private cluster on this machine with N CPUs whose head node carries every
target's timing resource (`sqexport-target-cpu`, ...), and shuts it down afterwards; `auto` and an
address join a running cluster, where the operator declares those resources on the nodes that
should time models (docs/ray.md).
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from sqexport.contracts.errors import ConfigError, first_line
from sqexport.contracts.targets import target_names
from sqexport.toolchain import signals

__all__ = ["RayTarget", "parse_ray_address", "require_ray", "ray_cluster", "target_resource", "node_label",
           "torch_threads_like_cli"]

EXTRA_HINT = "pip install 'sqexport[ray]'"


def target_resource(target: str) -> str:
    """The custom resource a node declares to time models for `target`."""
    return f"sqexport-target-{target}"


@dataclass(frozen=True)
class RayTarget:
    """Parsed --ray: `local_cpus` for local:N, else `address` ('auto' or host:port / ray://...)."""

    text: str
    local_cpus: int | None = None
    address: str | None = None


def parse_ray_address(text: str) -> RayTarget:
    text = text.strip()
    m = re.fullmatch(r"local:(\d+)", text)
    if m:
        if not 1 <= int(m.group(1)) <= 1024:
            raise ConfigError(f"--ray {text}: local:N needs 1 <= N <= 1024 CPUs")
        return RayTarget(text, local_cpus=int(m.group(1)))
    if text == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", text):
        return RayTarget(text, address=text)
    raise ConfigError(f"--ray {text!r}: expected local:N, auto, or a cluster address such as 10.0.0.5:6379 "
                      "or ray://10.0.0.5:10001")


def require_ray() -> None:
    """One line naming the extra when Ray is not installed (exit 2)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--ray needs Ray, which is not installed: {EXTRA_HINT}")


@contextmanager
def ray_cluster(target: RayTarget) -> Iterator[dict]:
    """Ray initialised for the duration; yields what the report says about the cluster."""
    require_ray()
    import ray

    temp = None
    handlers = _signal_handlers()
    try:
        if target.local_cpus is not None:
            # a private folder: sessions of other users' clusters under /tmp/ray are left alone
            temp = tempfile.mkdtemp(prefix="sqexport-ray-", dir="/tmp")
            ray.init(num_cpus=target.local_cpus, resources={target_resource(t): 1 for t in target_names()},
                     include_dashboard=False, _temp_dir=temp, log_to_driver=False, namespace="sqexport",
                     logging_level=logging.ERROR)
        else:
            ray.init(address=target.address, log_to_driver=False, namespace="sqexport", logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        raise ConfigError(f"cannot start or reach Ray at {target.text}: {first_line(exc)}") from None
    _restore(handlers)  # ray.init installs its own SIGTERM/SIGINT handlers, which skip our cleanup
    try:
        resources = ray.cluster_resources()
        yield {"address": target.text, "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
               "cpus": resources.get("CPU", 0.0),
               "timing_nodes": {t: resources.get(target_resource(t), 0.0) for t in target_names()}}
    finally:
        ray.shutdown()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def _signal_handlers() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in signals.HANDLED}


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def node_label() -> str:
    """`node id prefix @ IP` of the Ray node running the caller."""
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:12]}@{ray.util.get_node_ip_address()}"


def torch_threads_like_cli(omp_num_threads: str | None) -> None:
    """Ray starts workers with OMP_NUM_THREADS=1; torch's thread count changes the float sums
    behind calibration, so a task uses what `sqexport export` would use on this node (the
    caller's OMP_NUM_THREADS if it set one, else every core it may run on) to write the same bytes."""
    import torch

    from sqexport.runtime_check.session import default_threads

    n = int(omp_num_threads) if omp_num_threads and omp_num_threads.isdigit() else default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
