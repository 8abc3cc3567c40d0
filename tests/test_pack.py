"""Packs (gvae.pack): K seeds of one config trained in lockstep as one batched computation."""

import dataclasses
import math

import pandas as pd
import pytest
import torch

import gvae.trainer
from gvae.cli import main
from gvae.config import MODEL_NAMES, TrialConfig
from gvae.data import BatchSampler, PackBatches
from gvae.errors import GvaeError
from gvae.models import MODELS
from gvae.models.base import build_pack
from gvae.pack import StackedLinear
from gvae.study.trainable import mean_scalars
from gvae.trainer import CHECKPOINT_FILE, run_pack, run_trial
from tests import tiny_studies

TINY = dict(iterations=20, eval_every=10, eval_samples=300, batch_size=16)
SEEDS = (3, 7)
SHAPE = (1, 28, 28)


def quiet(_line: str) -> None:
    pass


def tiny(model: str, seed: int = 0, **overrides) -> TrialConfig:
    return TrialConfig(model=model, seed=seed, d=0.3, **{**TINY, **overrides}).validate()


def lone_weights(model) -> dict[str, list[torch.Tensor]]:
    """Each net's Linear weights as a lone trial holds them ([out, in])."""
    return {
        name: [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]
        for name, net in model.nets.items()
    }


def member_weights(pack, member: int) -> dict[str, list[torch.Tensor]]:
    """Member `member`'s Linear weights of a pack, transposed back to [out, in]."""
    return {
        name: [m.weight[member].t() for m in net.modules() if isinstance(m, StackedLinear)]
        for name, net in pack.nets.items()
    }


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_each_member_trains_as_its_lone_trial_does_to_rounding(model):
    torch.set_num_threads(1)
    images = torch.rand(200, *SHAPE)
    configs = [tiny(model, seed) for seed in SEEDS]
    lone_losses, lone_nets = [], []
    for config in configs:
        torch.manual_seed(config.seed)
        lone = MODELS[model](config, SHAPE, torch.device("cpu"))
        batches = BatchSampler(images, config.batch_size, config.seed)
        lone_losses.append([lone.train_step(batches) for _ in range(3)])
        lone_nets.append(lone_weights(lone))
    pack = build_pack(MODELS[model], configs, SHAPE, torch.device("cpu"))
    batches = PackBatches(images, configs[0].batch_size, list(SEEDS))
    pack_losses = [pack.train_step(batches) for _ in range(3)]

    for member in range(len(SEEDS)):
        for step in range(3):
            for name, value in lone_losses[member][step].items():
                packed = float(pack_losses[step][name][member])
                assert packed == pytest.approx(float(value), rel=1e-5, abs=1e-6), (step, name)
        for name, weights in member_weights(pack, member).items():
            for packed, lone in zip(weights, lone_nets[member][name], strict=True):
                # Adam moves a weight by up to lr (1e-3 here) a step whatever its gradient's
                # size, so rounding in a near-zero gradient shows at up to a small part of lr.
                torch.testing.assert_close(packed, lone, rtol=1e-3, atol=1e-4)
    # The members differ: each trains on its own seed's weights, batches and noise.
    first_layers = [next(iter(member_weights(pack, m).values()))[0] for m in (0, 1)]
    assert not torch.equal(*first_layers)


def test_a_pack_is_deterministic_and_its_members_match_their_lone_trials_first_window():
    configs = [tiny("cvaegan", seed) for seed in SEEDS]
    first = run_pack(configs, log=quiet)
    second = run_pack(configs, log=quiet)
    for a, b in zip(first, second, strict=True):
        assert strip_timing(a.curve) == strip_timing(b.curve)
        assert a.final == b.final
    for outcome, config in zip(first, configs, strict=True):
        assert outcome.config.seed == config.seed and outcome.diverged is None
        assert [row["iteration"] for row in outcome.curve] == [10, 20]
        assert len(outcome.final["image_entropies"]) == 300
        lone = run_trial(config, log=quiet)
        for key in ("recon_loss", "kl_loss", "d_loss"):
            assert outcome.curve[0][key] == pytest.approx(lone.curve[0][key], rel=1e-3)
    assert first[0].curve[-1]["recon_loss"] != first[1].curve[-1]["recon_loss"]


def strip_timing(curve: list[dict]) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k not in ("iterations_per_second", "eval_seconds")}
        for row in curve
    ]


def test_a_pack_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path):
    configs = [tiny("wgan", seed) for seed in SEEDS]
    straight = run_pack(configs, log=quiet)

    def keep_checkpoint(rows, directory):
        assert len(rows) == len(SEEDS)
        (tmp_path / CHECKPOINT_FILE).write_bytes((directory / CHECKPOINT_FILE).read_bytes())

    short = [dataclasses.replace(config, iterations=10) for config in configs]
    run_pack(short, report=keep_checkpoint, log=quiet)
    resumed = run_pack(configs, resume_from=tmp_path, log=quiet)
    for a, b in zip(straight, resumed, strict=True):
        assert strip_timing(a.curve) == strip_timing(b.curve)
        assert a.final == b.final


def test_a_diverging_member_stops_alone_and_leaves_the_others_numbers_untouched(monkeypatch):
    configs = [tiny("gan", seed) for seed in SEEDS]
    healthy = run_pack(configs, log=quiet)

    def poisoned(*args):
        pack = build_pack(*args)
        with torch.no_grad():
            next(pack.discriminator.parameters())[1].fill_(math.nan)  # member 1 only
        return pack

    monkeypatch.setattr(gvae.trainer, "build_pack", poisoned)
    reports = []
    outcomes = run_pack(configs, report=lambda rows, _: reports.append(rows), log=quiet)
    assert outcomes[1].diverged is not None and outcomes[1].diverged.iteration == 1
    assert outcomes[1].curve == []
    assert strip_timing(outcomes[0].curve) == strip_timing(healthy[0].curve)
    assert outcomes[0].final == healthy[0].final
    assert all(rows[1]["diverged_at"] == 1 for rows in reports)
    assert [rows[0]["iteration"] for rows in reports] == [10, 20]
    assert "image_entropies" in reports[-1][0]


def test_a_pack_whose_members_all_diverge_ends_with_each_ones_iteration():
    outcomes = run_pack([tiny("vae", seed, lr=1e12) for seed in SEEDS], log=quiet)
    assert all(o.diverged is not None and 1 <= o.diverged.iteration <= 20 for o in outcomes)


def test_a_pack_refuses_members_that_differ_in_more_than_seed_and_conv_nets():
    with pytest.raises(GvaeError, match="differ only in seed"):
        run_pack([tiny("gan", 0), tiny("gan", 1, lr=1e-3)], log=quiet)
    with pytest.raises(GvaeError, match="pack: only the mlp"):
        run_pack([tiny("gan", 0, arch="conv"), tiny("gan", 1, arch="conv")], log=quiet)


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory):
    return tiny_studies.storage(tmp_path_factory)


def test_a_packed_study_records_a_row_and_a_curve_per_member(storage):
    trials = pd.read_parquet(storage / "packed" / "trials.parquet")
    curves = pd.read_parquet(storage / "packed" / "curves.parquet")
    assert len(trials) == 6 and set(trials.status) == {"finished"}
    assert sorted(trials.groupby("pack").size()) == [1, 1, 2, 2]  # seeds [0, 1] and [2]
    for row in trials.itertuples():
        assert row.trial_id == f"{row.pack}_seed{row.seed}"
        assert list(row.pack_seeds) == ([0, 1] if row.seed < 2 else [2])
        assert row.iterations_done == 40 and len(row.final_image_entropies) == 300
        member = curves[curves.trial_id == row.trial_id]
        assert list(member.iteration) == [20, 40]
        assert member.iloc[-1]["mean_image_entropy"] == row.final_mean_image_entropy
    # Members of a pack are trials of their own seeds: their numbers differ.
    pair = trials[trials.seed < 2].groupby("pack").final_mean_image_entropy.nunique()
    assert list(pair) == [2, 2]


def test_reproduce_re_runs_a_members_whole_pack_and_matches_it(storage, capsys):
    trials = pd.read_parquet(storage / "packed" / "trials.parquet")
    member = trials[(trials.model == "cvaegan") & (trials.seed == 1)].iloc[0]
    assert main(["reproduce", "packed", "--storage", str(storage), "--trial", member.trial_id]) == 0
    printed = capsys.readouterr().out
    assert "(seeds [0, 1])" in printed
    assert "identical to the recorded trial" in printed, printed


def test_a_pack_whose_members_diverge_records_each_members_divergence(storage):
    trials = pd.read_parquet(storage / "packed_diverging" / "trials.parquet")
    assert sorted(trials.seed) == [0, 1] and set(trials.status) == {"diverged"}
    for row in trials.itertuples():
        assert 1 <= row.diverged_at <= 40 and row.iterations_done == row.diverged_at - 1
        assert "not finite" in row.error


def test_an_optuna_pack_is_one_suggestion_and_optuna_is_told_its_members_means(storage):
    import pickle

    trials = pd.read_parquet(storage / "optuna_packed" / "trials.parquet")
    assert len(trials) == 4 and set(trials.status) == {"finished"}
    assert (trials.suggestion == trials.pack).all() and trials.pack.nunique() == 2
    assert all(sorted(group.seed) == [0, 1] for _, group in trials.groupby("pack"))
    (state,) = (storage / "optuna_packed" / "tune").glob("searcher-state-*.pkl")
    told = pickle.loads(state.read_bytes())["_ot_study"].trials
    assert len(told) == 2
    for trial in told:
        members = trials[(trials.lam - trial.params["lam"]).abs() < 1e-12]
        means = [members.final_mode_entropy.mean(), members.final_mean_image_entropy.mean()]
        assert len(members) == 2 and trial.values == pytest.approx(means)


def test_a_packs_result_is_the_mean_over_the_members_with_finite_values():
    rows = [
        {
            "iteration": 20,
            "mode_entropy": 2.0,
            "frechet_distance": math.nan,
            "class_histogram": [1],
        },
        {"iteration": 20, "mode_entropy": 1.0, "frechet_distance": 40.0, "class_histogram": [2]},
        {"diverged_at": 7, "diverged_error": "losses not finite"},
        {},  # a member with nothing new
    ]
    result = mean_scalars(rows)
    assert result["iteration"] == 20
    assert result["mode_entropy"] == 1.5 and result["frechet_distance"] == 40.0
    assert "class_histogram" not in result and "diverged_at" not in result
    assert mean_scalars([{"diverged_at": 7, "diverged_error": "x"}, {"diverged_at": 9}]) == {}


def test_a_members_generator_unstacked_is_its_lone_trials_generator_with_its_weights():
    configs = [tiny("vaegan", seed) for seed in SEEDS]
    pack = build_pack(MODELS["vaegan"], configs, SHAPE, torch.device("cpu"))
    latent = torch.randn(5, configs[0].latent_dim)
    for member, config in enumerate(configs):
        torch.manual_seed(config.seed)
        lone = MODELS["vaegan"](config, SHAPE, torch.device("cpu"))  # the member's start
        sampled = pack.member_sampler(member)(latent)
        assert torch.equal(sampled, lone.sample(latent))  # the same weights, unbatched matmuls
        assert sampled.shape == (5, *SHAPE)
