"""A study folder's own files, besides its tables and Tune's experiment folder `tune/`:
`study.yaml`, the spec that ran; `format.json`, the folder's format and the versions the study
began under; `optuna.journal`, an Optuna search's study. Imports neither torch nor Ray:
`gvae study status` and `gvae report` read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import yaml

from gvae.errors import GvaeError
from gvae.io import check_reachable, read_bytes, write_bytes, write_json
from gvae.provenance import PACKAGES, installed_version
from gvae.study.results import ResultsStore, study_uri
from gvae.study.spec import StudySpec, parse_study, read_yaml

if TYPE_CHECKING:
    import optuna

EXPERIMENT = "tune"  # Tune's experiment folder (checkpoints, searcher state), which resume needs
SPEC_FILE = "study.yaml"
# What a study folder holds and how, besides Tune's own experiment folder: the tables' layout,
# which rows a trial writes. A folder of another format is refused, not converted.
FORMAT_FILE = "format.json"
FORMAT = 2
JOURNAL = "optuna.journal"  # an Optuna search's study (not on an RDB), which optuna-dashboard opens


def load_saved_spec(storage: str, name: str) -> tuple[StudySpec, dict[str, Any]]:
    """The spec the study `name` under `storage` ran with, validated and as written."""
    store = ResultsStore(study_uri(storage, name))
    check_reachable(store.uri)
    raw = _read_spec(store)
    if raw is None:
        raise GvaeError(
            f"name: no study named {name!r} under {storage}; pass --storage or run "
            "`gvae study run FILE` first"
        )
    return parse_study(raw), raw


def check_same_study(store: ResultsStore, raw_spec: dict[str, Any]) -> None:
    """Refuse to mix two different studies under one name, or to continue a study folder of
    another format."""
    saved = _read_spec(store)
    if saved is None:  # a new study
        return
    found = _read_format(store).get("format", 1)
    if found != FORMAT:
        versions = "an earlier" if found < FORMAT else "a later"
        raise GvaeError(
            f"study: {store.uri} was written by {versions} version of gvae (study format "
            f"{found}, this one reads {FORMAT}); finish it with the version that wrote it, or "
            "start it afresh under another name or after removing that folder"
        )
    if saved != raw_spec:
        raise GvaeError(
            f"name: a different study named {raw_spec['name']!r} already ran in {store.uri}; "
            "rename this study or remove that folder"
        )


def write_spec(store: ResultsStore, raw_spec: dict[str, Any]) -> None:
    """A new study's format file, then its spec: each appears whole or not at all, and a folder
    without the spec is a new study's."""
    versions = {name: installed_version(name) for name in PACKAGES}
    write_json(store.location(FORMAT_FILE), {"format": FORMAT, "versions": versions})
    write_bytes(store.location(SPEC_FILE), yaml.safe_dump(raw_spec, sort_keys=False).encode())


def journal_storage(path: str) -> optuna.storages.JournalStorage:
    """An Optuna journal file: what `optuna.load_study` and `optuna-dashboard` open. One that
    cannot be read (a line damaged in its middle) is one line naming it."""
    from optuna.storages import JournalStorage  # not for the commands that read no journal
    from optuna.storages.journal import JournalFileBackend

    try:
        return JournalStorage(JournalFileBackend(path))
    except ValueError:  # json.JSONDecodeError, or Optuna's "Invalid log format."
        raise GvaeError(
            f"study: the Optuna journal {path} is damaged and cannot be read; restore it from a "
            "copy, or start the study afresh under another name"
        ) from None


TAIL_CHUNK = 64 * 1024  # bytes read at a time, from the end, to find a journal's last newline


def cut_torn_tail(path: str, log: Callable[[str], None]) -> None:
    """Drop the last line of an Optuna journal when its write was cut short (a full disk, a
    machine that went down mid-write). Optuna reads past such a line, but its next append runs
    onto it: the journal is then unreadable, and the very next ask fails. Each write Optuna
    completed ends its line, so the torn line is a write that never took effect. Call it only
    while no search writes the journal (under the study's lease, before the searcher opens it).
    """
    if not os.path.exists(path):
        return
    with open(path, "rb+") as journal:
        size = journal.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(end - TAIL_CHUNK, 0)
            journal.seek(start)
            chunk = journal.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return  # whole
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        journal.truncate(end)
    log(
        f"optuna: {path} ended in a line cut short by an interrupted write; {size - end} bytes "
        "dropped"
    )


def note_other_versions(store: ResultsStore, log: Callable[[str], None]) -> None:
    """Say so when the study was begun under another minor release of Ray or Optuna, whose
    saved state this one may read differently."""
    began = _read_format(store).get("versions", {})
    for package in ("ray", "optuna"):
        then, now = began.get(package), installed_version(package)
        if then and now and then.split(".")[:2] != now.split(".")[:2]:
            log(f"study began under {package} {then}; continuing it under {package} {now}")


def _read_spec(store: ResultsStore) -> Any:
    """The saved spec as written; None when the folder has none (no study began there)."""
    data = read_bytes(store.location(SPEC_FILE))
    if data is None:
        return None
    try:
        return read_yaml(data.decode())
    except (UnicodeDecodeError, yaml.YAMLError):
        raise _damaged(store, SPEC_FILE, "copy the study file it ran with there") from None


def _read_format(store: ResultsStore) -> dict[str, Any]:
    data = read_bytes(store.location(FORMAT_FILE))
    if data is None:
        return {}
    try:
        found = json.loads(data)
    except ValueError:
        found = None
    if not isinstance(found, dict) or not isinstance(found.get("format", 1), int):
        fix = f'write {{"format": {FORMAT}}} there if this version of gvae began the study'
        raise _damaged(store, FORMAT_FILE, fix)
    return found


def _damaged(store: ResultsStore, name: str, fix: str) -> GvaeError:
    return GvaeError(
        f"study: {store.location(name)} is damaged and cannot be read; {fix}, or start the study "
        f"afresh under another name or after removing {store.uri}"
    )
