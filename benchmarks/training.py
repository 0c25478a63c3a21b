"""Training figures: step throughput at a config's sizes, and a finished run's training time and held-out metrics.

    python benchmarks/training.py throughput [--config configs/paper.yaml] [--device cuda] [--steps 10]
    python benchmarks/training.py run --results RESULTS_DIR
    python benchmarks/training.py chest --results RESULTS_DIR [--samples SHEET] [--bootstrap 1000]
    python benchmarks/training.py curve --work WORK_DIR [--config configs/benchmark.yaml] [--fold 0]
        [--stage1-epochs N] [--stage2-epochs N] [--every N] [--out DIR]

``throughput`` times the decomposition GAN's update (discriminators + generator, seed 004's losses) and the
stage-3 regressor's update on random batches at the config's image size, networks and batch size (the config
is layered over config.yaml as Snakemake does): median of ``--steps`` timed steps after two warm-up steps,
images per second, peak GPU memory. ``run`` sums a finished workflow's training job times (Snakemake
benchmark files) and prints ``results/metrics/bmd.tsv``. ``chest`` is seed 000's track of a run that trained
only it (targets ``results/models/chest_bmd/fold*``, no decomposition methods, so no ``evaluate_bmd``): the job
times, each fold's held-out landmark error, and seed 000 Table I (R, RMSE, osteoporosis AUC per vertebra, every
variant) from the folds' held-out predictions, scored as ``evaluate_bmd`` scores them, R with its 95 % CI.
``curve`` is the decomposition's learning curve on one fold of a run whose targets and folds are made (the
run's ``--directory``): stages 1 and 2 trained by :func:`bmdpipe.train.decomposition.train_stage` as the rule
trains them (stage epochs from the options), and every ``--every`` stage-2 epochs (default: at the end of each
cosine cycle) the BMD fit of ``bmd_from_decomposition`` on the generator's images of the training views, its PCC
against each DXA column there and on the held-out views, and the PCC of the held-out images' mean intensity
against their targets' (seed 004 Table 3's density agreement). Nothing of the run is changed; the figures
also go to ``--out``'s ``stage2/metrics.csv``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from snakemake.utils import update_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, timed  # noqa: E402

from bmdpipe.evaluate.bmd import SEED000_METHODS, evaluate, seed000_table  # noqa: E402
from bmdpipe.evaluate.decomposition import image_accuracy  # noqa: E402
from bmdpipe.evaluate.metrics import pcc  # noqa: E402
from bmdpipe.models.decomposition import MultiscaleDiscriminator, build_generator  # noqa: E402
from bmdpipe.models.regression import weighted_l1  # noqa: E402
from bmdpipe.samples import load_samples  # noqa: E402
from bmdpipe.train.bmd_fit import fit_columns  # noqa: E402
from bmdpipe.train.decomposition import gan_step, predict, train_stage  # noqa: E402
from bmdpipe.train.jobs import fold_views  # noqa: E402
from bmdpipe.train.loop import TrainState, unwrap  # noqa: E402
from bmdpipe.train.regression import build_regressor  # noqa: E402
from bmdpipe.train.settings import TrainSettings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAINING_RULES = ["folds", "train_decomposition", "bmd_from_decomposition", "train_regression", "train_baseline",
                  "evaluate_bmd"]
CHEST_RULES = ["train_chest_landmarks", "train_chest_bmd"]


def merged(config: Path | None) -> dict:
    """config.yaml with ``config`` layered over it, as Snakemake's ``--configfile`` does."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    if config:
        update_config(cfg, yaml.safe_load(config.read_text()))
    return cfg


def throughput(args: argparse.Namespace) -> None:
    settings = TrainSettings.from_config(merged(args.config)["train"])
    device = torch.device(args.device)
    dec, h, w, b = settings.decomposition, *settings.image_size, settings.batch_size
    channels = len(settings.sites)
    gen = build_generator(dec.arch(channels)).to(device)
    disc = MultiscaleDiscriminator(1 + channels, dec.ndf, dec.n_layers, dec.num_d).to(device)
    opt_g, opt_d = torch.optim.AdamW(gen.parameters(), lr=1e-4), torch.optim.AdamW(disc.parameters(), lr=1e-4)
    amp = device.type == "cuda" and settings.amp
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x, y = torch.randn(b, 1, h, w, device=device), torch.rand(b, channels, h, w, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def gan() -> None:
        with torch.autocast(device.type, enabled=amp):
            gan_step(gen, disc, opt_g, opt_d, x, y, dec, scaler)
        sync()

    reg = settings.regression
    arch = {"kind": "stage3", "generator": dec.arch(channels), "feature_hw": [h // 4, w // 4], "n_outputs": 3,
            "head": {"dims": list(reg.dims), "depths": list(reg.depths), "heads": list(reg.heads)}}
    regressor = build_regressor(arch).to(device)
    opt_r = torch.optim.AdamW(regressor.parameters(), lr=1e-4)
    target, weight = torch.randn(b, 3, device=device), torch.ones(b, 3, device=device)

    def regression() -> None:
        with torch.autocast(device.type, enabled=amp):
            loss = weighted_l1(regressor(x).float(), target, weight)
        opt_r.zero_grad()
        loss.backward()
        opt_r.step()
        sync()

    print(f"machine: {machine()}; device {device}" + (f" ({torch.cuda.get_device_name(device)})"
                                                         if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"config: {args.config or 'config.yaml'}: {dec.generator} {dec.encoder} ngf {dec.ngf}, image {h}x{w}, "
          f"batch {b}, {channels} site channel(s), AMP {amp}")
    for name, func in (("decomposition GAN step", gan), ("stage-3 regression step", regression)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            func()
        median, times = timed(func, args.steps)
        mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
        print(f"{name}: median {median * 1000:.0f} ms per step of {b} ({b / median:.1f} images/s; "
              f"min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f} ms){mem}")
    print(f"peak RSS {peak_rss_mb():.0f} MB")


def job_times(root: Path, rules: list[str]) -> float:
    """Print each rule's job count and wall times from a finished run's Snakemake benchmark files; their sum, s."""
    total = 0.0
    for rule in rules:
        files = sorted((root / "benchmarks").glob(f"{rule}*.tsv")) + sorted((root / "benchmarks" / rule).glob("*.tsv"))
        seconds = [float(pd.read_csv(f, sep="\t")["s"].iloc[0]) for f in files]
        total += sum(seconds)
        if seconds:
            print(f"{rule}: {len(seconds)} job(s), {sum(seconds):.0f} s in all "
                  f"(each {min(seconds):.0f}-{max(seconds):.0f} s)")
    return total


def run_summary(args: argparse.Namespace) -> None:
    root = Path(args.results)
    print(f"machine: {machine()}")
    total = job_times(root, TRAINING_RULES)
    print(f"training jobs summed: {total:.0f} s ({total / 60:.1f} min)")
    metrics = root / "metrics" / "bmd.tsv"
    if metrics.exists():
        table = pd.read_csv(metrics, sep="\t")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def chest_summary(args: argparse.Namespace) -> None:
    root = Path(args.results)
    print(f"machine: {machine()}")
    total = job_times(root, CHEST_RULES)
    print(f"chest training jobs summed: {total:.0f} s ({total / 60:.1f} min)")
    for path in sorted((root / "models" / "chest_landmarks").glob("fold*/chest_landmarks.json")):
        d = json.loads(path.read_text())
        print(f"landmarks fold {d['fold']}: {d.get('n_views', 0)} held-out views, mean error "
              f"{d.get('error_mm_mean', float('nan')):.2f} mm, median {d.get('error_mm_median', float('nan')):.2f} mm, "
              f"{100 * d.get('within_5_mm', float('nan')):.1f} % within 5 mm")
    folds = sorted((root / "models" / "chest_bmd").glob("fold*"))
    predictions = pd.concat([pd.read_csv(d / "predictions.tsv", sep="\t") for d in folds], ignore_index=True)
    landmarks = pd.concat([pd.read_csv(d / "landmarks.tsv", sep="\t") for d in folds], ignore_index=True)
    held_out = landmarks.merge(predictions[["patient_id", "view", "fold"]].drop_duplicates())
    print(f"{len(folds)} fold(s), {predictions.patient_id.nunique()} held-out patients, "
          f"{int(held_out.flagged.sum())} of {len(held_out)} held-out views with a low-confidence landmark")
    sheet = load_samples(args.samples or root.parent / "resources" / "virtual_cohort" / "samples.tsv",
                         check_paths=False)
    sexes = dict(sheet.drop_duplicates("patient_id").set_index("patient_id")["sex"])
    figures = evaluate(predictions, sexes, n_boot=args.bootstrap)
    methods = [m for m in SEED000_METHODS if m in figures["methods"]]
    print("seed 000 Table I (held-out, folds pooled; RMSE g/cm²):")
    print(seed000_table(figures, methods).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for method in methods:
        for column, col in figures["methods"][method]["columns"].items():
            r = col["agreement"]["pcc"]
            lo, hi = (f"{v:.3f}" if v is not None else "–" for v in r["ci95"])
            print(f"{method} {column}: R {r['value']:.3f} [{lo}, {hi}], {col['n_patients']} patients")


def curve_figures(generator: torch.nn.Module, train: list, test: list, columns: list[str],
                  settings: TrainSettings) -> dict[str, float]:
    """The stage-2 generator's decomposition figures: per DXA column the PCC of the BMD fit (chosen and fitted on
    the generator's images of ``train``, as ``bmd_from_decomposition``) on ``train`` and ``test``; per site the
    PCC of the held-out images' mean intensity against their targets'."""
    thresholds = settings.decomposition.thresholds
    dxa = [k for k, c in enumerate(columns) if c.startswith("dxa_")]
    images = {"train": predict(generator, train), "test": predict(generator, test)}
    labels = {"train": np.stack([v.bmd for v in train])[:, dxa], "test": np.stack([v.bmd for v in test])[:, dxa]}
    fits = fit_columns(images["train"], labels["train"], [columns[k] for k in dxa], settings.sites, thresholds)
    row = {f"pcc_{part}_{fit.column}": pcc(labels[part][:, j], fit.apply(images[part]))
           for j, fit in enumerate(fits) for part in ("train", "test")}
    accuracy = image_accuracy(images["test"], np.stack([v.roi for v in test]), thresholds)
    for j, site in enumerate(settings.sites):
        row[f"pcc_mean_intensity_test_{site}"] = pcc(accuracy["mean_true"][:, j], accuracy["mean_pred"][:, j])
    return row


def learning_curve(args: argparse.Namespace) -> None:
    cfg = merged(args.config)
    dec = cfg["train"].setdefault("decomposition", {})
    for key in ("stage1_epochs", "stage2_epochs"):
        if getattr(args, key) is not None:
            dec[key] = getattr(args, key)
    settings = TrainSettings.from_config(cfg["train"])
    results = args.work / "results"
    samples = args.samples or args.work / "resources" / "virtual_cohort" / "samples.tsv"
    train, test, columns = fold_views(results / "dataset" / "folds.json", args.fold, results / "targets", samples,
                                      settings)
    every = args.every or settings.decomposition.restart_epochs
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}, {torch.get_num_threads()} threads")
    print(f"config: {args.config or 'config.yaml'}; fold {args.fold}: {len(train)} training views, {len(test)} "
          f"held-out; stage 1 {settings.decomposition.stage1_epochs} epochs, stage 2 "
          f"{settings.decomposition.stage2_epochs}, cosine restarts every {settings.decomposition.restart_epochs}")

    def figures(state: TrainState) -> dict[str, float]:
        if (state.epoch + 1) % every:
            return {}
        row = curve_figures(unwrap(state.modules["g"]), train, test, columns, settings)
        print(f"stage 2 epoch {state.epoch + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        return row

    out = args.out
    seed = settings.seed + args.fold
    stage1 = train_stage(train, 1, out / "stage1", out / "work1", settings, seed=seed)
    train_stage(train, 2, out / "stage2", out / "work2", settings, init=stage1, seed=seed, evaluate=figures)
    metrics = pd.read_csv(out / "stage2" / "metrics.csv")
    for stage in (1, 2):
        seconds = pd.read_csv(out / f"stage{stage}" / "metrics.csv")["seconds"]
        print(f"stage {stage}: median {seconds.median():.1f} s per epoch")
    shown = [c for c in metrics if c.startswith("pcc_")]
    scored = metrics.dropna(how="all", subset=shown)[["epoch", *shown]]
    print(scored.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--config", type=Path, default=None, help="layered over config.yaml, e.g. configs/paper.yaml")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--steps", type=int, default=10)
    r = sub.add_parser("run")
    r.add_argument("--results", required=True, help="a finished workflow's results/ folder")
    c = sub.add_parser("chest")
    c.add_argument("--results", required=True, help="a finished chest-track run's results/ folder")
    c.add_argument("--samples", type=Path, default=None,
                   help="the run's sample sheet (default: the virtual cohort's, beside results/)")
    c.add_argument("--bootstrap", type=int, default=1000, help="resamples of whole patients for the CIs")
    k = sub.add_parser("curve")
    k.add_argument("--work", type=Path, required=True, help="a run's --directory with its targets and folds made")
    k.add_argument("--config", type=Path, default=None, help="layered over config.yaml, e.g. configs/benchmark.yaml")
    k.add_argument("--samples", type=Path, default=None,
                   help="the run's sample sheet (default: the virtual cohort's under WORK/resources)")
    k.add_argument("--fold", type=int, default=0)
    k.add_argument("--stage1-epochs", type=int, default=None, help="default: the config's")
    k.add_argument("--stage2-epochs", type=int, default=None, help="default: the config's")
    k.add_argument("--every", type=int, default=None, help="stage-2 epochs between figures (default: the restarts')")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--out", type=Path, default=Path("decomposition_curve"), help="models and metrics.csv go here")
    args = parser.parse_args()
    {"throughput": throughput, "run": run_summary, "chest": chest_summary, "curve": learning_curve}[args.command](args)


if __name__ == "__main__":
    main()
