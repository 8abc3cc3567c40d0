"""`gvae train` as a user runs it: the files it leaves, resuming, and the bad-input table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from gvae.cli import main

TINY = ["--iterations", "20", "--eval-every", "10", "--eval-samples", "200", "--batch-size", "16"]


def test_train_leaves_curve_grids_checkpoint_and_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            ["train", "--model", "cvaegan", "--lam", "1.0", "--d", "0.5", *TINY, "--out", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "it 10/20" in printed and "it 20/20" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "checkpoint.pt",
        "config.json",
        "curve.parquet",
        "metrics.json",
        "samples_0000010.png",
        "samples_0000020.png",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "cvaegan" and config["lr"] == 2e-4 and config["d"] == 0.5
    curve = pd.read_parquet(out / "curve.parquet")
    assert curve.iteration.tolist() == [10, 20]
    assert {"recon_loss", "kl_loss", "gan_loss", "d_loss"} <= set(curve.columns)


def test_train_runs_with_the_cpu_threads_asked_and_records_them(tmp_path):
    before = torch.get_num_threads()
    asked = before + 1  # not what the process has: the count must come from the flag
    out = tmp_path / "run"
    try:
        assert (
            main(["train", "--model", "vae", *TINY, "--cpu-threads", str(asked), "--out", str(out)])
            == 0
        )
        assert torch.get_num_threads() == asked
    finally:
        torch.set_num_threads(before)
    assert json.loads((out / "metrics.json").read_text())["threads"] == asked
    assert json.loads((out / "config.json").read_text())["cpu_threads"] == asked
    default = tmp_path / "default"
    assert main(["train", "--model", "vae", *TINY, "--out", str(default)]) == 0
    assert json.loads((default / "metrics.json").read_text())["threads"] == before  # on the CPU


def test_resume_continues_a_run_to_more_iterations(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "vae", *TINY, "--out", str(out)]) == 0
    longer = [*TINY[:1], "40", *TINY[2:]]
    assert main(["train", "--model", "vae", *longer, "--out", str(out), "--resume"]) == 0
    curve = pd.read_parquet(out / "curve.parquet")
    assert curve.iteration.tolist() == [10, 20, 30, 40]
    straight = tmp_path / "straight"
    assert main(["train", "--model", "vae", *longer, "--out", str(straight)]) == 0
    expected = pd.read_parquet(straight / "curve.parquet")
    for column in ("mode_entropy", "mean_image_entropy", "recon_loss", "kl_loss"):
        assert curve[column].tolist() == expected[column].tolist()


def test_resume_from_a_damaged_checkpoint_is_one_line_and_leaves_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "vae", *TINY, "--out", str(out)]) == 0
    checkpoint = out / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short by a crash or a copy
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    capsys.readouterr()
    longer = [*TINY[:1], "40", *TINY[2:]]
    assert main(["train", "--model", "vae", *longer, "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"gvae: error: --resume: {checkpoint} is damaged and cannot be read; restore it from a "
        "copy, or drop --resume and pass a new --out\n"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


BAD = [
    (["--model", "gann"], "model"),
    (["--dataset", "cifar10"], "dataset"),
    (["--lam", "-1"], "lam"),
    (["--d", "-0.5"], "d"),
    (["--lr", "0"], "lr"),
    (["--iterations", "0"], "iterations"),
    (["--batch-size", "0"], "batch_size"),
    (["--iterations", "10", "--eval-every", "20"], "eval_every"),
    (["--dataset", "mnist", "--data-root", "EMPTY"], "dataset"),
    (["--graph", "fast"], "graph"),
    (["--graph", "on", "--device", "cpu"], "graph"),
]


@pytest.mark.parametrize("flags,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2_and_nothing_written(flags, field, tmp_path, capsys):
    flags = [str(tmp_path / "empty") if f == "EMPTY" else f for f in flags]
    out = tmp_path / "run"
    assert main(["train", *TINY, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gvae: error: {field}") and "\n" not in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="graph: on runs where torch finds CUDA")
def test_graph_on_where_torch_finds_no_gpu_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--graph", "on", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "gvae: error: graph: on, but CUDA graphs need a CUDA device and this trial runs on cpu; "
        "set graph: auto (eager then) or off"
    )
    assert not out.exists()


def test_unwritable_out_and_used_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", *TINY, "--out", str(blocker / "run")]) == 2
    assert "--out" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    assert main(["train", *TINY, "--out", str(used)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    if Path("/proc").is_dir():  # writable by os.access for root, yet nothing can be made there
        assert main(["train", *TINY, "--out", "/proc/gvae-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gvae: error: --out") and "\n" not in err, err


def test_counts_past_their_limit_and_non_finite_floats_are_refused(tmp_path, capsys):
    empty = str(tmp_path / "empty")  # were the limit not checked first, mnist is not found there
    cases = [
        (
            ["--iterations", "10000000000000", "--dataset", "mnist", "--data-root", empty],
            "iterations: 10000000000000 is more than the limit of 1000000000 iterations a trial "
            "may train; pass a value from 1 to 1000000000",
        ),
        (["--lr", "inf"], "lr: must be a finite number > 0 (got inf); pass a finite number > 0"),
        (
            ["--clip", "nan"],
            "clip: must be a finite number > 0 (got nan); pass a finite number > 0",
        ),
    ]
    for flags, line in cases:
        assert main(["train", *TINY, *flags, "--out", str(tmp_path / "run")]) == 2
        assert capsys.readouterr().err == f"gvae: error: {line}\n"
        assert list(tmp_path.iterdir()) == []
