"""The SLURM profile on a real one-node SLURM cluster (issue 8, items 1 and 2).

tests/slurm/start_local_slurm.sh brings up munged, MariaDB, slurmdbd, slurmctld and
slurmd on this machine (installing Debian's slurm-wlm, munge and MariaDB packages
when they are missing; needs root), the workflow runs on a tiny cohort through
``--profile profiles/slurm``, and tests/slurm/stop_local_slurm.sh stops exactly the
daemons the start script recorded, by PID, whatever the outcome.

Measured on the CI machine kind (Debian bookworm, 2 CPUs, 24 GB, root, idle), 2026-11-23,
in a fresh-clone ``make test``: cluster start 3-4 s with the packages installed; the sheet
cohort through SLURM 8 min 52 s (4 SLURM jobs: two per-patient groups, the QC table, the
report; local run 52 s); the tiny virtual cohort from simulation through training and the
report 20 min 45 s (18 SLURM jobs; local run 5 min 24 s); the whole module about 32 min.
Most of the SLURM time is the plugin's status polling (its interval grows by 10 s per
check that finds nothing finished) and Snakemake starting again inside every SLURM job.
``pytest -s tests/test_slurm.py`` prints these figures for each run.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from conftest import REPO, build_small_cohort, snakemake_run

from bmdpipe.evaluate.bmd import SEED000_METHODS

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent / "slurm"
PROFILE = REPO / "profiles" / "slurm"
#: Snakemake jobs the cohort below makes: (rule, patient); rule `all` is local.
PER_PATIENT = ("ingest_ct", "ingest_xray", "calibrate", "segment", "roi", "register", "targets")
EXPECTED_JOBS = ({(rule, p) for rule in PER_PATIENT for p in ("p01", "p02", "p03")}
                 | {("qc_table", None), ("report", None)})
#: Keys of the JSON summaries that may differ between two runs of the same input.
TIMING_KEY = re.compile(r"(^|_)(time|timestamp|date|datetime|seconds|elapsed|duration|runtime)(_|$)", re.I)


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:] if text else ""


def _run(cmd, *, timeout, env=None, cwd=REPO):
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A running one-node SLURM cluster with accounting (slurmdbd), stopped in teardown by PID."""
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM cluster needs root (CI runs as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_ACCOUNTING": "slurmdbd"}
    env.pop("SLURM_CONF", None)
    try:
        proc, start_s = _run(["bash", str(SCRIPTS / "start_local_slurm.sh")], env=env, timeout=600)
        print(f"\n[test_slurm] cluster start: {start_s:.1f} s\n{proc.stdout}", end="")
        assert proc.returncode == 0, (
            f"start_local_slurm.sh exited {proc.returncode}\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
        )
        yield {"dir": state, "env": env, "start_s": start_s}
    finally:
        proc, stop_s = _run(["bash", str(SCRIPTS / "stop_local_slurm.sh"), "--purge-data"], env=env, timeout=300)
        print(f"\n[test_slurm] cluster stop: {stop_s:.1f} s\n{proc.stdout}{proc.stderr}", end="")
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            assert not (state / "run" / f"{name}.pid").exists(), f"{name} was not stopped"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three patients as a hospital would send them, as in test_workflow.py: one bad CT, one bad radiograph."""
    return build_small_cohort(tmp_path_factory.mktemp("slurm_cohort"))


@pytest.fixture(scope="module")
def local_run(cohort):
    """The reference: the same cohort run locally, as test_workflow.py runs it."""
    work = cohort / "work_local"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--configfile", str(cohort / "config.yaml"), "--directory", str(work)]
    proc, seconds = _run(cmd, timeout=900)
    print(f"\n[test_slurm] local run (--cores 2): {seconds:.1f} s")
    assert proc.returncode == 0, f"local run exited {proc.returncode}\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
    return work


def _test_profile(path: Path) -> Path:
    """Overrides the one-node test cluster needs on top of profiles/slurm (a later --profile wins per key)."""
    base = yaml.safe_load((PROFILE / "config.yaml").read_text())
    overrides = {
        "max-threads": 2,  # a job asking for more CPUs than the node has would pend forever
        # the plugin guesses the account with a broken sacct pipe when none is given; root
        # is created in slurmdbd by slurmctld itself
        "default-resources": list(base["default-resources"]) + ["slurm_account=root"],
        "slurm-init-seconds-before-status-checks": 2,  # the default 40 s first status check is for busy clusters
        "slurm-keep-successful-logs": True,  # the job logs show which Snakemake jobs ran in which SLURM job
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(overrides, sort_keys=False))
    return path


def _slurm_workflow(local_slurm, config: Path, work: Path, profile_dir: Path, *, label: str, timeout: int) -> dict:
    """``snakemake --profile profiles/slurm`` (plus the test overrides) on ``config`` in ``work``; must succeed."""
    overrides = _test_profile(profile_dir)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
           "--profile", str(PROFILE), "--profile", str(overrides), "--workflow-profile", "none",
           "--configfile", str(config), "--directory", str(work)]
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 5))
    try:
        proc, seconds = _run(cmd, env=local_slurm["env"], timeout=timeout)
    except subprocess.TimeoutExpired as err:
        log = (local_slurm["dir"] / "log" / "slurmctld.log").read_text()
        raise AssertionError(f"the SLURM run did not finish in {err.timeout} s\n{_tail(str(err.stdout))}\n"
                             f"{_tail(str(err.stderr))}\nslurmctld.log:\n{_tail(log)}") from err
    print(f"\n[test_slurm] {label}, SLURM run (--profile profiles/slurm): {seconds:.1f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"SLURM run exited {proc.returncode}\n{_tail(out, 8000)}"
    return {"work": work, "out": out, "seconds": seconds, "started": started, "env": local_slurm["env"]}


@pytest.fixture(scope="module")
def slurm_run(local_slurm, cohort):
    """The cohort through --profile profiles/slurm: every job submitted with sbatch."""
    return _slurm_workflow(local_slurm, cohort / "config.yaml", cohort / "work_slurm", cohort / "profile_test",
                           label="sheet cohort", timeout=1200)


def _sacct(env, *args):
    proc = subprocess.run(["sacct", "-n", "-P", *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split("|") for line in proc.stdout.splitlines() if line.strip()]


def _jobs_in_slurm_log(text: str) -> set[tuple[str, str | None]]:
    """(rule, wildcards) of every job a Snakemake run inside a SLURM job reports: ("segment", "p01"),
    ("train_decomposition", "fold=0, stage=1"); a patient's jobs give the patient alone, a job without
    wildcards None."""
    jobs = set()
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", "\n" + text):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        w = re.search(r"^\s*wildcards: (.+)$", block, re.M)
        wildcards = w.group(1).strip() if w else None
        if wildcards and wildcards.startswith("patient="):
            wildcards = wildcards.removeprefix("patient=")
        jobs.add((m.group(1), wildcards))
    return jobs


def test_every_job_went_through_sbatch(slurm_run):
    out, env = slurm_run["out"], slurm_run["env"]
    submitted = {int(j) for j in re.findall(r"has been submitted with SLURM jobid (\d+)", out)}
    assert submitted, _tail(out)

    # sacct: exactly the submitted jobs carry this run's name (the plugin's run uuid), all COMPLETED
    rows = _sacct(env, "-X", "-j", ",".join(map(str, sorted(submitted))), "-o", "JobID,JobName,State,Account")
    assert {int(r[0]) for r in rows} == submitted, rows
    assert all(r[2] == "COMPLETED" for r in rows), rows
    assert all(r[3] == "root" for r in rows), rows
    names = {r[1] for r in rows}
    assert len(names) == 1, rows
    run_jobs = _sacct(env, "-X", "-S", slurm_run["started"], "--name", names.pop(), "-o", "JobID")
    assert {int(r[0]) for r in run_jobs} == submitted

    # the plugin's job logs: every Snakemake job ran inside one of the submitted SLURM jobs
    logs = sorted((slurm_run["work"] / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {int(f.stem) for f in logs} == submitted, logs
    ran = [job for f in logs for job in _jobs_in_slurm_log(f.read_text())]
    assert sorted(ran, key=str) == sorted(EXPECTED_JOBS, key=str), ran
    # and nothing but the target rule `all` ran in the submitting process
    assert set(re.findall(r"^\s*localrule (\w+):", out, re.M)) == {"all"}, _tail(out)


def test_per_patient_steps_share_slurm_jobs(slurm_run):
    """profiles/slurm groups the per-patient steps: 21 per-patient jobs, the QC table and the report make 4 SLURM
    jobs, not 23. Two groups (ingestion and calibration; segmentation to targets), because the U-Net trains
    between them and a path may not leave a group and re-enter it.

    The plugin runs a group's jobs one after another, and the profile's group_slots
    resource makes Snakemake ask for exactly that: the largest threads and memory of
    one member and the sum of their runtimes.
    """
    out = slurm_run["out"]
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", out)
    assert len(submitted) == 4, _tail(out)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    # an experiment's own calibration, ROI and targets join group per_patient; this cohort runs no experiment
    assert set(profile["groups"]) == set(PER_PATIENT) | {f"{rule}_experiment" for rule in ("calibrate", "roi", "targets")}
    for name in ("prepare", "per_patient"):
        rules = [rule for rule, group in profile["groups"].items() if group == name and rule in PER_PATIENT]
        (job,) = [job for job, log in submitted if f"/group_{name}" in log]
        log = next(slurm_run["work"].glob(f".snakemake/slurm_logs/group_{name}*/{job}.log"))
        assert _jobs_in_slurm_log(log.read_text()) == {(r, p) for r in rules for p in ("p01", "p02", "p03")}
        minutes = sum(3 * profile["set-resources"][rule]["runtime"] for rule in rules)
        mem = max(profile["set-resources"][rule]["mem_mb"] for rule in rules)
        (row,) = _sacct(slurm_run["env"], "-X", "-j", job, "-o", "AllocCPUS,ReqMem,Timelimit")
        assert row == ["1", f"{mem}M", f"{minutes // 60:02d}:{minutes % 60:02d}:00"], (name, row)


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if not TIMING_KEY.search(k)}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_outputs_match_a_local_run(slurm_run, local_run):
    slurm_results, local_results = slurm_run["work"] / "results", local_run / "results"
    qc_slurm = pd.read_csv(slurm_results / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    qc_local = pd.read_csv(local_results / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    assert len(qc_local) == 23  # 7 ingest rows, 4 per patient (calibrate, segment, roi, targets), 4 registrations
    pd.testing.assert_frame_equal(qc_slurm, qc_local)

    def products(results):
        stages = ("ct", "xray", "calibration")
        return sorted(p.relative_to(results) for stage in stages for p in (results / stage).rglob("*") if p.is_file())

    files = products(local_results)
    assert files == products(slurm_results)
    assert sum(f.name.endswith(".nii.gz") for f in files) == 5  # 2 CTs, 3 radiographs
    for rel in files:
        a, b = local_results / rel, slurm_results / rel
        if rel.name.endswith(".nii.gz"):
            ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
            assert ia.GetPixelID() == ib.GetPixelID(), rel
            np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ia), sitk.GetArrayViewFromImage(ib), err_msg=str(rel))
            assert ia.GetSpacing() == ib.GetSpacing(), rel
            assert ia.GetOrigin() == ib.GetOrigin(), rel
            assert ia.GetDirection() == ib.GetDirection(), rel
        elif rel.suffix == ".json":
            assert _without_timing(json.loads(b.read_text())) == _without_timing(json.loads(a.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel
    for rule, patient in EXPECTED_JOBS:
        log = f"{rule}/{patient}.log" if patient else f"{rule}.log"
        assert (slurm_run["work"] / "results" / "logs" / log).exists(), log


# --- the whole chain, simulation to metrics, on the tiny virtual cohort (conftest.tiny_virtual_config) ---

#: (rule, wildcards) of every job of the tiny virtual cohort; `all` is local.
VIRTUAL_PATIENTS = ("sim000", "sim001", "sim002")
VIRTUAL_JOBS = (
    {(rule, p) for rule in PER_PATIENT for p in VIRTUAL_PATIENTS}
    | {("simulate_cohort", None), ("train_segmenter", None), ("qc_table", None), ("folds", None),
       ("evaluate_bmd", None), ("report", None), ("export_model", None)}
    | {("train_decomposition", f"fold={k}, stage={s}") for k in (0, 1) for s in (1, 2)}
    | {(rule, f"fold={k}") for rule in ("bmd_from_decomposition", "train_regression", "train_baseline",
                                        "train_localiser", "train_chest_landmarks", "robustness")
       for k in (0, 1)}
)


@pytest.fixture(scope="module")
def slurm_virtual_run(local_slurm, virtual_run, tmp_path_factory):
    """The tiny virtual cohort through --profile profiles/slurm: simulation, CT side, registration, targets,
    the U-Net and all training, every job submitted with sbatch."""
    root = tmp_path_factory.mktemp("slurm_virtual")
    print(f"\n[test_slurm] tiny virtual cohort, local run (--cores 2): {virtual_run['seconds']:.1f} s")
    # without the training experiments (same rules again under other names; 25 more SLURM jobs would double
    # this test's time); the profile's entries for them are checked in test_profile_covers_every_rule
    cfg = copy.deepcopy(virtual_run["cfg"])
    cfg["evaluate"]["experiments"] = {name: None for name in cfg["evaluate"]["experiments"]}
    cfg["train"]["chest_bmd"]["variants"] = []  # nor seed 000's models (their rule's profile entry: as above)
    config = root / "no_experiments.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return _slurm_workflow(local_slurm, config, root / "work", root / "profile_test",
                           label="tiny virtual cohort through training", timeout=2400)


def test_training_chain_went_through_sbatch(slurm_virtual_run):
    out, env = slurm_virtual_run["out"], slurm_virtual_run["env"]
    submitted = {int(j) for j in re.findall(r"has been submitted with SLURM jobid (\d+)", out)}
    rows = _sacct(env, "-X", "-j", ",".join(map(str, sorted(submitted))), "-o", "JobID,State")
    assert {int(r[0]) for r in rows} == submitted and all(r[1] == "COMPLETED" for r in rows), rows
    logs = sorted((slurm_virtual_run["work"] / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {int(f.stem) for f in logs} == submitted, logs
    ran = [job for f in logs for job in _jobs_in_slurm_log(f.read_text())]
    assert sorted(ran, key=str) == sorted(VIRTUAL_JOBS, key=str), ran
    assert set(re.findall(r"^\s*localrule (\w+):", out, re.M)) == {"all"}, _tail(out)
    # the GAN, stage-3 and baseline jobs are SLURM jobs of their own, with the profile's memory and time
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    for rule in ("train_decomposition", "train_regression", "train_baseline"):
        jobs = [f.stem for f in logs if f"rule_{rule}" in str(f)]
        assert len(jobs) == (4 if rule == "train_decomposition" else 2), logs
        for row in _sacct(env, "-X", "-j", ",".join(jobs), "-o", "AllocCPUS,ReqMem"):
            assert row == ["2", f"{profile[rule]['mem_mb']}M"], (rule, row)


def test_training_chain_matches_a_local_run(slurm_virtual_run, virtual_run):
    slurm, local = slurm_virtual_run["work"] / "results", virtual_run["work"] / "results"
    qc_slurm = pd.read_csv(slurm / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    qc_local = pd.read_csv(local / "qc" / "patients.tsv", sep="\t", keep_default_na=False)
    pd.testing.assert_frame_equal(qc_slurm, qc_local)
    assert json.loads((slurm / "dataset" / "folds.json").read_text()) == \
        json.loads((local / "dataset" / "folds.json").read_text())
    for patient in VIRTUAL_PATIENTS:
        for a in sorted((local / "targets" / patient).glob("*.npz")):
            with np.load(a) as za, np.load(slurm / "targets" / patient / a.name) as zb:
                assert sorted(za.files) == sorted(zb.files)
                for key in za.files:
                    np.testing.assert_array_equal(za[key], zb[key], err_msg=f"{patient}/{a.name}:{key}")
    # seeded CPU training with the same threads: the same held-out predictions
    pa = pd.read_csv(local / "metrics" / "predictions.tsv", sep="\t")
    experiments = tuple(f" @{name}" for name in virtual_run["cfg"]["evaluate"]["experiments"])
    pa = pa[~pa.method.str.endswith(experiments) & ~pa.method.isin(SEED000_METHODS)].reset_index(drop=True)  # not via SLURM
    pb = pd.read_csv(slurm / "metrics" / "predictions.tsv", sep="\t")
    assert len(pa) > 0
    pd.testing.assert_frame_equal(pa, pb, rtol=1e-5)


def test_profile_covers_every_rule():
    """Every rule but `all` has the SLURM profile's runtime and memory (the default 30 min would kill training)."""
    proc = snakemake_run("--list-rules")
    rules = set(proc.stdout.split()) - {"all"}
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    assert len(rules) > 20 and {"train_decomposition_experiment", "targets_experiment"} <= rules, proc.stdout
    assert rules <= set(profile), rules - set(profile)
    for rule in rules:
        assert profile[rule]["runtime"] > 0 and (profile[rule].get("mem_mb", 0) > 0 or rule == "demo_cohort"), rule
