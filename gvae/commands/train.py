"""`gvae train`: one trial on this machine, with its curve, sample grids and checkpoint in --out."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from gvae.config import TrialConfig
from gvae.errors import GvaeError
from gvae.io import CHECKPOINT_FILE, readable_checkpoint, write_json, write_parquet

FIELD_HELP = {
    "model": "gan | wgan | vae | vaegan | cvaegan",
    "dataset": "mnist5k (offline) | mnist | fashion-mnist | celeba (see docs/celeba.md)",
    "arch": "network family: mlp (the paper's nets) | conv (Larsen et al., 28x28 or 64x64)",
    "lam": "λ: weight of the constrained GAN term (cvaegan), >= 0",
    "d": "d: margin below which the GAN loss is ignored (cvaegan), >= 0",
    "lr": "learning rate (default: 2e-4 GANs, 5e-5 WGAN, 1e-3 VAE)",
    "gan_loss": "generator loss: nonsaturating (Eq. 2) | minimax (Eq. 1)",
    "n_critic": "WGAN critic steps per generator step",
    "clip": "WGAN critic weight clipping",
    "eval_every": "evaluate (and checkpoint) every this many iterations",
    "eval_samples": "generated samples per evaluation",
    "device": "auto | cpu | cuda | cuda:N",
    "cpu_threads": "torch CPU threads; 0: one on a GPU, every core on the CPU",
    "graph": "the step as a CUDA graph: off | on | auto (on a GPU when it can be captured)",
}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one trial",
        description="Train one trial; leaves curve.parquet, samples_*.png, checkpoint.pt and "
        "config.json in --out.",
    )
    defaults = TrialConfig()
    for field in dataclasses.fields(TrialConfig):
        default = getattr(defaults, field.name)
        kind = float if field.name == "lr" else type(default)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            dest=field.name,
            type=kind,
            default=default,
            help=f"{FIELD_HELP.get(field.name, field.name)} (default: {default})",
        )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/...)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrialConfig)}
    config = TrialConfig.from_dict(fields).validate().resolved()
    out = args.out or Path("runs") / f"{config.model}-{config.dataset}-seed{config.seed}"
    resume_from = _check_out(out, args.resume)
    # Imported once the arguments are checked: torch takes 2 s, which neither `gvae --help` nor a
    # mistyped option should wait for.
    import torch

    from gvae.data import load_dataset
    from gvae.divergence import Diverged
    from gvae.graphs import check_device
    from gvae.trainer import cpu_threads, resolve_device, run_trial

    load_dataset(config.dataset, config.data_root)  # a missing dataset fails before any write
    device = resolve_device(config.device)
    check_device(config, device)
    torch.set_num_threads(cpu_threads(config, device, default=torch.get_num_threads()))

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. under /proc, which os.access calls writable for root
        raise GvaeError(
            f"--out: cannot create {out} ({error.strerror}); pass an --out you can write"
        ) from None
    write_json(out / "config.json", config.to_dict())
    try:
        outcome = run_trial(
            config, report=_OutReporter(out), resume_from=resume_from, out_dir=out, log=_log
        )
    except Diverged as error:
        print(f"gvae: trial diverged: {error}", file=sys.stderr)
        return 1
    summary = {
        "device": outcome.device,
        "threads": torch.get_num_threads(),  # training on the CPU is deterministic for a count
        "evaluator_accuracy": outcome.evaluator_accuracy,
        "real_data": outcome.reference,
        # On faces, mode_entropy counts the joint values of these attributes rather than classes.
        "mode_attributes": list(outcome.mode_attributes),
        "final": outcome.curve[-1],
    }
    write_json(out / "metrics.json", summary)
    print(f"done: {out}/ (curve.parquet, samples_*.png, {CHECKPOINT_FILE}, config.json)")
    return 0


def _check_out(out: Path, resume: bool) -> Path | None:
    """Fail before writing anything when --out cannot be used; return the checkpoint to resume."""
    existing = next(parent for parent in [out, *out.parents] if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise GvaeError(f"--out: {existing} is not a writable folder; pass an --out you can write")
    has_checkpoint = (out / CHECKPOINT_FILE).exists()
    if resume:
        if not has_checkpoint:
            raise GvaeError(f"--resume: no {CHECKPOINT_FILE} in {out}; drop --resume to start anew")
        if not readable_checkpoint(out):
            raise GvaeError(
                f"--resume: {out / CHECKPOINT_FILE} is damaged and cannot be read; restore it "
                "from a copy, or drop --resume and pass a new --out"
            )
        return out
    if out.exists() and any(out.iterdir()):
        raise GvaeError(f"--out: {out} is not empty; pass --resume to continue it or a new folder")
    return None


class _OutReporter:
    """Keeps the latest checkpoint and the curve so far in the output folder at each evaluation."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict[str, Any]] = []
        if (out / "curve.parquet").exists():
            import pandas as pd

            self.rows = pd.read_parquet(out / "curve.parquet").to_dict("records")

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        row = {k: v for k, v in metrics.items() if k not in _ARRAYS}
        self.rows = [r for r in self.rows if r["iteration"] < row["iteration"]] + [row]
        tmp = self.out / f".{CHECKPOINT_FILE}.tmp"
        shutil.copyfile(checkpoint_dir / CHECKPOINT_FILE, tmp)
        os.replace(tmp, self.out / CHECKPOINT_FILE)
        write_parquet(self.out / "curve.parquet", self.rows)


_ARRAYS = {"samples_png", "sample_labels", "image_entropies"}


def _log(line: str) -> None:
    print(line, flush=True)
