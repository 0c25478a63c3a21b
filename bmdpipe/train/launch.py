"""Run a training job in this process, or in several under torchrun (DistributedDataParallel).

A Snakemake ``script:`` cannot itself be started by torchrun, so a training rule
that gets more than one process (``train.processes``: one per GPU with
``train.device: cuda``; gloo processes on the CPU, which is how the tests run the
launch path) calls :func:`launch`: the job's keyword arguments are pickled next to
its output and ``python -m torch.distributed.run --standalone --nproc_per_node N
-m bmdpipe.train.launch ARGS`` runs the same job function in every process. The
training loops join the process group themselves (:func:`bmdpipe.train.loop.setup_device`)
and write their outputs on rank 0 only.

With one process the job function simply runs here: one code path either way.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("bmdpipe")


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def launch(target: str, kwargs: dict[str, Any], *, processes: int = 1, threads: int = 1,
           log_file: str | os.PathLike[str] | None = None) -> None:
    """Call ``target(**kwargs)`` once here (``processes`` 1) or in ``processes`` torchrun processes.

    Args:
        target: ``"package.module:function"``; the function takes only picklable keyword arguments
            (paths, numbers, config dicts), since every process rebuilds its data from them.
        kwargs: its keyword arguments.
        processes: DDP processes on this node (``--nproc_per_node``).
        threads: CPU threads for the whole job; each process gets ``max(1, threads // processes)``.
        log_file: rank 0 appends its log records here (the rule's log); other ranks log warnings to stderr.

    Raises:
        RuntimeError: when torchrun exits with an error (its output is in the rule's log and stderr).
    """
    if processes < 1:
        raise ValueError(f"processes must be ≥ 1, got {processes}")
    if processes == 1 or "LOCAL_RANK" in os.environ:
        _resolve(target)(**kwargs)
        return
    per_process = max(1, threads // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
    with tempfile.TemporaryDirectory(prefix="bmdpipe-launch-") as tmp:
        args = Path(tmp) / "job.pkl"
        args.write_bytes(pickle.dumps({"target": target, "kwargs": kwargs, "threads": per_process,
                                       "log_file": str(log_file) if log_file else None}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(processes), "-m", "bmdpipe.train.launch", str(args)]
        log.info("launching %s in %d processes: %s", target, processes, " ".join(cmd))
        for handler in logging.getLogger().handlers:
            handler.flush()
        proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun ({processes} processes) of {target} exited with {proc.returncode}; "
                           "each rank's traceback is on stderr above")


def _worker(args_path: str) -> None:
    """One torchrun process: set threads and logging, run the job, leave the process group."""
    import torch
    import torch.distributed as dist

    job = pickle.loads(Path(args_path).read_bytes())
    torch.set_num_threads(job["threads"])
    from bmdpipe.workflow import setup_logging

    rank = int(os.environ.get("RANK", 0))
    if rank == 0 and job["log_file"]:
        setup_logging(job["log_file"], append=True, tag=f"[rank {rank}]")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s %(name)s [rank {rank}]: %(message)s",
                            force=True)
        logging.captureWarnings(True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    log.info("%s: rank %d of %d, %d threads", job["target"], rank, world, job["threads"])
    try:
        _resolve(job["target"])(**job["kwargs"])
        log.info("%s: rank %d done", job["target"], rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
