"""Real tiny studies on Ray, run once per test session and shared by the report and reproduce tests.

Not a conftest fixture: each test module wraps `storage()` in its own session fixture, and the
module-level cache makes the studies run once however many modules ask.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gvae.cli import main

TINY = """
dataset: mnist5k
iterations: 40
eval_every: 20
fixed: {batch_size: 16, eval_samples: 300}
"""
STUDIES = {
    # Four models x two seeds: Table 1 with confidence intervals, Figs. 2-8.
    "grid": "models: [gan, vae, vaegan, cvaegan]\nsearch: {grid: {seed: [0, 1]}}",
    # A learning rate of 1e12 makes the VAE's loss infinite within a few steps: a diverged trial.
    "diverging": "models: [vae]\nsearch: {grid: {lr: [0.001, 1.0e+12]}}",
    # Three seeds in packs of two: four Tune trials, six member rows.
    "packed": "models: [gan, cvaegan]\nsearch: {grid: {seed: [0, 1, 2]}}\nresources: {pack: 2}",
    # A pack whose members both diverge (the learning rate of "diverging").
    "packed_diverging": "models: [vae]\nsearch: {grid: {lr: [1.0e+12], seed: [0, 1]}}\n"
    "resources: {pack: 2}",
    "optuna": """models: [cvaegan]
search:
  optuna:
    trials: 3
    replicates: 2
    objectives: {mode_entropy: max, mean_image_entropy: min}
    space: {lam: {low: 0.1, high: 10.0, log: true}, d: {low: 0.0, high: 1.0}}
""",
}

STUDIES["optuna_packed"] = STUDIES["optuna"].replace("trials: 3", "trials: 2") + (
    "resources: {pack: 2}\n"  # each suggestion's two replicates trained as one pack
)

_storage: list[Path] = []


def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The results folder holding the studies named in STUDIES (run on the first call)."""
    if not _storage:
        import ray

        root = tmp_path_factory.mktemp("tiny-studies")
        # One Ray for all of them: `gvae study run` stops only a Ray it started itself.
        ray.init(log_to_driver=False)
        try:
            for name, body in STUDIES.items():
                path = root / f"{name}.yaml"
                path.write_text(f"name: {name}\n{TINY}{body}\n")
                assert main(["study", "run", str(path), "--storage", str(root / "results")]) == 0
        finally:
            ray.shutdown()
        _storage.append(root / "results")
    return _storage[0]
