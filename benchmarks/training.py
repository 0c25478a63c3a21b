"""Training figures: step throughput at a config's sizes, and a finished run's training time and held-out metrics.

    python benchmarks/training.py throughput [--config configs/paper.yaml] [--device cuda] [--steps 10]
    python benchmarks/training.py run --results RESULTS_DIR
    python benchmarks/training.py chest --results RESULTS_DIR [--samples SHEET] [--bootstrap 1000]

``throughput`` times the decomposition GAN's update (discriminators + generator, seed 004's losses) and the
stage-3 regressor's update on random batches at the config's image size, networks and batch size (the config
is layered over config.yaml as Snakemake does): median of ``--steps`` timed steps after two warm-up steps,
images per second, peak GPU memory. ``run`` sums a finished workflow's training job times (Snakemake
benchmark files) and prints ``results/metrics/bmd.tsv``. ``chest`` is seed 000's track of a run that trained
only it (targets ``results/models/chest_bmd/fold*``, no decomposition methods, so no ``evaluate_bmd``): the job
times, each fold's held-out landmark error, and seed 000 Table I (R, RMSE, osteoporosis AUC per vertebra, every
variant) from the folds' held-out predictions, scored as ``evaluate_bmd`` scores them, R with its 95 % CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch
import yaml
from snakemake.utils import update_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mb, timed  # noqa: E402

from bmdpipe.evaluate.bmd import SEED000_METHODS, evaluate, seed000_table  # noqa: E402
from bmdpipe.models.decomposition import MultiscaleDiscriminator, build_generator  # noqa: E402
from bmdpipe.models.regression import weighted_l1  # noqa: E402
from bmdpipe.samples import load_samples  # noqa: E402
from bmdpipe.train.decomposition import gan_step  # noqa: E402
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
    args = parser.parse_args()
    {"throughput": throughput, "run": run_summary, "chest": chest_summary}[args.command](args)


if __name__ == "__main__":
    main()
