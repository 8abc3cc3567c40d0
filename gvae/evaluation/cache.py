"""The on-disk cache of trained evaluators, keyed by everything that determines their weights, so
every study, trial and process scores samples with the very same network."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from gvae.data import Dataset
from gvae.errors import GvaeError
from gvae.evaluation.measurement import Evaluator
from gvae.evaluation.training import (
    channel_evaluator,
    channel_evaluator_key,
    default_epochs,
    evaluator_key,
    train_evaluator,
)
from gvae.io import exclusive


def default_cache_dir() -> Path:
    """$GVAE_CACHE if set, else ~/.cache/gvae."""
    env = os.environ.get("GVAE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gvae"


def _training_lock(path: Path, log: Callable[[str], None]) -> contextlib.AbstractContextManager:
    """Parallel trials and drivers wait for one training of the evaluator at `path` instead of
    each training it."""
    return exclusive(
        path.with_suffix(".lock"),
        lambda: log(f"evaluator: waiting for another process to finish {path}"),
    )


def _atomic_save(state: dict, path: Path) -> None:
    """Write to a temp file in the same directory, then rename: readers never see a torn file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _try_load(
    path: Path, key: str, device: str | torch.device, log: Callable[[str], None]
) -> Evaluator | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") != key:
            raise ValueError(f"key {state.get('key')!r} != {key!r}")
        return Evaluator.from_state(state, device)
    except Exception as error:  # any unreadable or stale file is simply rebuilt
        log(f"evaluator: ignoring unusable cache file {path} ({error}); retraining")
        return None


def _prepare_cache_dir(cache_dir: Path) -> Path:
    target = cache_dir / "evaluators"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise GvaeError(
            f"cannot create evaluator cache {target} ({error.strerror}); "
            f"set GVAE_CACHE to a writable directory"
        ) from error
    return target


def load_or_train_evaluator(
    dataset: Dataset,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
    epochs: int | None = None,
) -> Evaluator:
    """The evaluator for `dataset`: from the disk cache if present, else trained and cached.

    A stacked dataset's evaluator reuses the cached digit classifier of its `channel_dataset`
    (trained first if need be; `epochs` are its epochs) and is cached with its reference row.
    """
    folder = _prepare_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if dataset.channel_dataset is not None:
        digits = load_or_train_evaluator(dataset.channel_dataset, cache_dir, device, log, epochs)
        key = channel_evaluator_key(dataset, digits.key)
        path = folder / f"{dataset.name}-{key}.pt"
        with _training_lock(path, log):
            evaluator = _try_load(path, key, device, log)
            if evaluator is None:
                evaluator = channel_evaluator(dataset, digits, key)
                _atomic_save(evaluator.state(), path)
                log(
                    f"evaluator: {dataset.name} channels labelled by {digits.key}, cached at {path}"
                )
        return evaluator.to(device)
    if epochs is None and not dataset.has_attributes:
        epochs = default_epochs(len(dataset.train_labels))
    key = evaluator_key(dataset, epochs)
    path = folder / f"{dataset.name}-{key}.pt"
    with _training_lock(path, log):
        evaluator = _try_load(path, key, device, log)
        if evaluator is not None:
            log(f"evaluator: loaded {path} (held-out accuracy {evaluator.accuracy:.1%})")
            return evaluator
        evaluator = train_evaluator(dataset, epochs, device, key)
        _atomic_save(evaluator.state(), path)
    log(
        f"evaluator: trained on {dataset.name} in {evaluator.meta['train_seconds']:.1f} s, "
        f"held-out accuracy {evaluator.accuracy:.1%}, cached at {path}"
    )
    return evaluator
