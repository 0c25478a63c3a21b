"""Glue between Snakemake rules and bmdpipe stages.

A per-patient stage runs inside :class:`PatientStage`: logging goes to the
rule's log file, and bad input (:class:`~bmdpipe.errors.InputError`) either
stops the workflow (``on_patient_error: fail``) or is recorded as a failed
summary JSON that the QC table reports (``on_patient_error: skip``), so that
the other patients finish. Programming errors always propagate.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from bmdpipe import __version__
from bmdpipe.errors import InputError
from bmdpipe.io.atomic import write_json

log = logging.getLogger("bmdpipe")


def setup_logging(log_file: str | os.PathLike[str], *, append: bool = False, tag: str = "") -> None:
    """Send bmdpipe's log records and Python warnings to ``log_file``.

    Args:
        append: add to the file (a torchrun process joining its rule's log) instead of overwriting it.
        tag: written after the logger name of every record, e.g. ``[rank 0]``.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(log_file),
        filemode="a" if append else "w",
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s{' ' + tag if tag else ''}: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)


class PatientStage:
    """One stage of one patient, run from a workflow script.

    Args:
        stage: stage name, recorded in every summary.
        patient: the sheet's patient_id.
        on_error: ``"skip"`` or ``"fail"`` (config ``on_patient_error``).
    """

    def __init__(self, stage: str, patient: str, on_error: str) -> None:
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.stage = stage
        self.patient = patient
        self.on_error = on_error

    def attempt(self, func: Callable[[], Any], summary_path: str | os.PathLike[str], **labels: Any) -> bool:
        """Run ``func``; on bad input record a failed summary at ``summary_path``.

        Returns:
            True when ``func`` succeeded.
        """
        what = " ".join([self.patient, *[f"{k}={v}" for k, v in labels.items()]])
        start = time.perf_counter()
        try:
            func()
        except InputError as exc:
            log.error("%s %s failed: %s", self.stage, what, exc)
            if self.on_error == "fail":
                raise
            write_json(summary_path, failed_summary(self.stage, self.patient, str(exc), **labels))
            return False
        log.info("%s %s done in %.2f s", self.stage, what, time.perf_counter() - start)
        return True


def failed_summary(stage: str, patient: str, reason: str, **labels: Any) -> dict[str, Any]:
    """The summary JSON of a stage that could not run for this patient."""
    return {"stage": stage, "status": "failed", "reason": reason, "patient_id": patient, "bmdpipe_version": __version__, **labels}


def upstream_failure(summary_path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` when an earlier stage's summary says it failed, repeating its reason.

    A stage whose input could not be made records the chain in the QC table
    instead of failing on a missing file.
    """
    import json

    p = Path(summary_path)
    if not p.exists():
        raise InputError(f"{p}: missing; the earlier stage did not write its summary")
    summary = json.loads(p.read_text())
    if summary.get("status") != "ok":
        raise InputError(f"earlier stage {summary.get('stage')} failed: {summary.get('reason', 'no reason recorded')}")


def fold_job(sm: Any) -> tuple[dict[str, Any], Any]:
    """Start of a per-fold training script: log file and threads, then ``(job arguments, settings)``.

    The job arguments are the picklable keyword arguments every fold job in :mod:`bmdpipe.train.jobs`
    takes (``folds``, ``fold``, ``targets_root``, ``samples``, ``settings``), so that
    :func:`bmdpipe.train.launch.launch` can hand them to torchrun processes; ``settings`` is the
    parsed :class:`~bmdpipe.train.settings.TrainSettings`.

    Args:
        sm: the ``snakemake`` object of a rule with ``wildcards.fold``, inputs ``folds``, ``samples`` and
            ``targets`` (every patient's targets folder) and ``params.settings`` (the train config slice).
    """
    import json

    import torch

    from bmdpipe.train.settings import TrainSettings

    setup_logging(sm.log[0])
    torch.set_num_threads(sm.threads)
    config = json.loads(json.dumps(dict(sm.params.settings)))  # plain dicts and lists, as the checkpoint key hashes them
    job = {"folds": str(sm.input.folds), "fold": int(sm.wildcards.fold),
           "targets_root": str(Path(sm.input.targets[0]).parent), "samples": str(sm.input.samples),
           "settings": config}
    return job, TrainSettings.from_config(config)
