"""`sqexport export --auto --ray ...`: the search's candidates measured as Ray tasks.

The search itself (which level to prune next, when to stop) stays here: it is a sequence of
decisions, each depending on the last measurement. What leaves this process is the measuring:
per candidate one accuracy task (any node: a CPU slot) and one timing task, which runs only on a
node that declares the target's resource (`sqexport-target-cpu`: 1). Asking for the whole unit
means one timing task per node at a time, and asking for no CPU lets an operator keep other work
off a timing node (`ray start --num-cpus=0 --resources=...`), so timings are not disturbed by
neighbours. The evaluation data, the FP32 reference outputs, the example inputs and baseline.onnx
go into the object store once per search; each candidate's model.onnx once per candidate.
The chosen model's final verification runs here, as in a plain run.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.tasks import get_task
from sqexport.runtime_check.gates import evaluate_gates
from sqexport.toolchain import signals
from sqexport.toolchain.candidates import Evaluator, PairTimer
from sqexport.toolchain.ray_cluster import node_label, parse_ray_address, ray_cluster, target_resource
from sqexport.toolchain.search import AutoConfig, run_auto

__all__ = ["RayEvaluator", "run_auto_on_ray"]

_POLL_S = 0.5


def _accuracy_task(context: dict, model: bytes) -> tuple[dict, str]:
    from sqexport.runtime_check.accuracy import run_session, task_metrics
    from sqexport.runtime_check.session import make_session

    out = run_session(make_session(model, context["threads"]), context["eval_batches"], context["postprocess"])
    return task_metrics(get_task(context["task"]), context["base_out"], out, context["labels"]), node_label()


def _latency_task(latency: Callable | None, feed: dict, threads: int, baseline: bytes, model: bytes) -> dict:
    """Both files written on the timing node, then timed interleaved as in a local search."""
    with tempfile.TemporaryDirectory(prefix="sqexport-timing-") as tmp:
        paths = Path(tmp) / "baseline.onnx", Path(tmp) / "model.onnx"
        paths[0].write_bytes(baseline)
        paths[1].write_bytes(model)
        result = (latency or PairTimer(feed, threads))(*paths)
    return {**result, "node": node_label()}


def _get(refs: list) -> list:
    """ray.get that an interrupt can stop: waits in short slices and checks for signals."""
    import ray

    try:
        while True:
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=_POLL_S)
            if not waiting:
                return ray.get(refs)
            signals.check()
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise


class RayEvaluator(Evaluator):
    """Evaluator whose accuracy and latency measurements are Ray tasks (see the module docstring);
    `latency` is the injectable timing function of run_auto, run on the timing node."""

    def __init__(self, spec, baseline: Path, threads: int, gates, latency: Callable | None, target: str,
                 cluster: dict):
        import ray

        super().__init__(spec, baseline, threads, gates, latency)  # the FP32 outputs, once, here
        self.target, self.cluster = target, cluster
        self.context = ray.put({"threads": threads, "eval_batches": spec.eval_batches, "postprocess": spec.postprocess,
                                "task": spec.task, "base_out": self.base_out, "labels": spec.eval_labels})
        self.feed = ray.put(spec.example_inputs)
        self.baseline_bytes = ray.put(Path(baseline).read_bytes())
        self.custom_latency = latency
        self.accuracy_remote = ray.remote(_accuracy_task).options(num_cpus=1, max_retries=2)
        self.latency_remote = ray.remote(_latency_task).options(
            num_cpus=0, resources={target_resource(target): 1}, max_retries=2)
        self.latency_nodes: list[str] = []
        self.accuracy_nodes: list[str] = []

    def __call__(self, model: Path) -> tuple[dict, dict, list[dict]]:
        import ray

        model_bytes = ray.put(Path(model).read_bytes())
        (accuracy, acc_node), latency = _get([
            self.accuracy_remote.remote(self.context, model_bytes),
            self.latency_remote.remote(self.custom_latency, self.feed, self.threads, self.baseline_bytes,
                                       model_bytes)])
        for nodes, node in ((self.accuracy_nodes, acc_node), (self.latency_nodes, latency["node"])):
            if node not in nodes:
                nodes.append(node)
        return accuracy, latency, evaluate_gates(self.gates, accuracy, latency)

    def report_info(self) -> dict:
        return {"ray": {"address": self.cluster["address"], "nodes": self.cluster["nodes"],
                        "latency_resource": target_resource(self.target),
                        "latency_measured_on": self.latency_nodes, "accuracy_measured_on": self.accuracy_nodes,
                        "final_verification_on": node_label()}}


def run_auto_on_ray(address: str, recipe, spec, outdir: Path, progress, config: AutoConfig = AutoConfig(),
                    latency: Callable | None = None) -> dict:
    """run_auto with candidates measured on the cluster at `address` (local:N, auto, host:port)."""
    target = parse_ray_address(address)
    with ray_cluster(target) as cluster:
        if not cluster["timing_nodes"].get(recipe.target):
            raise ConfigError(f"no node of the Ray cluster at {address} carries the resource "
                              f"{target_resource(recipe.target)}, so no node may time candidates; start one with "
                              f"ray start --resources='{{\"{target_resource(recipe.target)}\": 1}}' (docs/ray.md)")
        progress.message(f"auto: candidates measured on Ray {address}: {cluster['nodes']} node(s), "
                         f"{cluster['timing_nodes'][recipe.target]:g} timing node(s) for {recipe.target}")

        def evaluator(spec, baseline, threads, gates, latency_fn):
            return RayEvaluator(spec, baseline, threads, gates, latency_fn, recipe.target, cluster)

        return run_auto(recipe, spec, outdir, progress, config, latency, evaluator)
