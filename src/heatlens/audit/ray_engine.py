"""The Ray engine: shards computed by a pool of Ray actors, each loading the model once.

Ray Data turns the pending shard numbers into a dataset; ``map_batches`` runs ``ShardWorker`` actors
(an actor pool of ``workers``, one shard per call). Each actor loads the model from its spec when it starts,
then reads, explains and scores whole shards exactly as the local engine does (``engine.compute_shard``)
and returns the ``ShardResult``; the driver commits results to the store as they arrive, in any order.
So the store is written by one process, and the records equal the local engine's up to float rounding.

The workers read the images themselves: file paths must be visible on every node (a shared file system),
in-memory sources travel to the actors through Ray's object store.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import Source
from .engine import Plan, _progress, compute_shard, load_shard
from .store import Store


class ShardWorker:
    """A Ray Data actor: the model loaded once, then ``__call__`` on batches of shard numbers."""

    def __init__(self, loadable: tuple, device: Any, source: Source, plan: Plan, threads: int) -> None:
        import torch

        from .models import load_spec

        torch.set_num_threads(max(1, threads))  # an actor owns its CPUs, not the whole machine
        self.source, self.plan = source, plan
        spec, weights, input_size = loadable
        self.model = load_spec(spec, weights=weights, device=device, input_size=input_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = [int(s) for s in batch["shard"]]
        results = [compute_shard(self.model, load_shard(self.source, self.model, self.plan, s), self.plan) for s in shards]
        return {"shard": np.asarray(shards), "result": np.asarray([pickle.dumps(r) for r in results], dtype=object)}


def run_ray(store: Store, manifest: dict, source: Source, loadable: tuple, device: Any, plan: Plan,
            pending: Sequence[int], *, workers: int | None = None, address: str | None = None) -> None:
    """Compute ``pending`` shards on Ray (``ray.init()`` here, or ``address``'s cluster) and commit them.
    loadable: (spec, weights, input_size), what each actor loads the model from."""
    try:
        import ray
    except ImportError:
        raise ImportError("engine='ray' needs Ray: pip install 'heatlens[ray]'") from None
    from ..batching import progress_enabled

    # Ray Data's own progress bars and per-second INFO lines would drown heatlens' bar
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.INFO if progress_enabled() else logging.WARNING)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else \
            ray.init(include_dashboard=False, log_to_driver=False)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        workers = workers if workers is not None else max(1, min(cpus, len(pending)))
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        threads = max(1, cpus // workers)
        ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                            fn_constructor_kwargs={"loadable": loadable, "device": device,
                                                   "source": source, "plan": plan, "threads": threads})
        bar = _progress(plan, manifest)
        try:
            for row in ds.iter_rows():
                result = pickle.loads(row["result"])
                store.commit(result, manifest)
                if bar is not None:
                    bar.update(result.stop - result.start)
        finally:
            if bar is not None:
                bar.close()
    finally:
        logger.setLevel(level)
        if started:
            ray.shutdown()

