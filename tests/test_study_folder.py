"""A study folder's own files: the spec that ran, and the format and versions it began under."""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from gvae.cli import main
from gvae.errors import GvaeError
from gvae.provenance import installed_version
from gvae.study import folder
from gvae.study.lease import StudyLease
from gvae.study.results import ResultsStore, study_uri
from tests.test_study_spec import VALID


@pytest.fixture
def store(tmp_path) -> ResultsStore:
    """The folder of a study `t` that began here, written as a new study writes it."""
    made = ResultsStore(study_uri(str(tmp_path), "t"))
    folder.write_spec(made, VALID)
    return made


def format_file(store: ResultsStore) -> Path:
    return Path(store.path(folder.FORMAT_FILE))


def test_a_new_study_records_its_spec_format_and_versions(store, tmp_path):
    spec, raw = folder.load_saved_spec(str(tmp_path), "t")
    assert raw == VALID and spec.name == "t" and spec.models == ("gan", "cvaegan")
    written = json.loads(format_file(store).read_text())
    assert written["format"] == folder.FORMAT
    assert written["versions"]["ray"] == installed_version("ray")
    assert written["versions"]["optuna"] == installed_version("optuna")
    folder.check_same_study(store, VALID)  # the same study continues


def test_a_folder_of_another_format_is_refused_with_what_to_do(store):
    format_file(store).unlink()  # the first format had no format file
    with pytest.raises(GvaeError) as refused:
        folder.check_same_study(store, VALID)
    assert str(refused.value) == (
        f"study: {store.uri} was written by an earlier version of gvae (study format 1, this "
        f"one reads {folder.FORMAT}); finish it with the version that wrote it, or start it "
        "afresh under another name or after removing that folder"
    )
    format_file(store).write_text(json.dumps({"format": folder.FORMAT + 1}))
    with pytest.raises(GvaeError, match="written by a later version of gvae"):
        folder.check_same_study(store, VALID)


def test_another_study_under_the_same_name_is_refused(store):
    with pytest.raises(GvaeError) as refused:
        folder.check_same_study(store, {**VALID, "iterations": 80})
    assert str(refused.value) == (
        f"name: a different study named 't' already ran in {store.uri}; rename this study or "
        "remove that folder"
    )


def test_a_study_begun_under_another_ray_minor_says_so(store):
    written = json.loads(format_file(store).read_text())
    ray, optuna = written["versions"]["ray"], written["versions"]["optuna"]
    major, minor, *_ = ray.split(".")
    written["versions"]["ray"] = f"{major}.{int(minor) - 1}.3"
    format_file(store).write_text(json.dumps(written))
    lines: list[str] = []
    folder.note_other_versions(store, lines.append)
    assert lines == [
        f"study began under ray {major}.{int(minor) - 1}.3; continuing it under ray {ray}"
    ]
    written["versions"]["ray"] = f"{major}.{minor}.999"  # another patch release: nothing to say
    format_file(store).write_text(json.dumps(written))
    lines.clear()
    folder.note_other_versions(store, lines.append)
    assert lines == [] and optuna == installed_version("optuna")


def test_gvae_study_run_refuses_an_older_folder_in_one_line_and_leaves_it(store, tmp_path, capsys):
    format_file(store).unlink()
    before = {path: path.read_bytes() for path in Path(store.root).rglob("*")}
    study = tmp_path / "t.yaml"
    study.write_text(yaml.safe_dump(VALID))
    assert main(["study", "run", str(study), "--storage", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("gvae: error: study: ") and "\n" not in error, error
    assert "finish it with the version that wrote it" in error
    assert {path: path.read_bytes() for path in Path(store.root).rglob("*")} == before
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_status_and_resume_of_no_such_study_name_the_fix(tmp_path, capsys):
    for command in (["study", "status", "nope"], ["study", "resume", "nope"], ["report", "nope"]):
        assert main([*command, "--storage", str(tmp_path)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"gvae: error: name: no study named 'nope' under {tmp_path}; pass --storage or run "
            "`gvae study run FILE` first"
        )


SPEC_FIX = "copy the study file it ran with there"
FORMAT_FIX = 'write {"format": 2} there if this version of gvae began the study'


@pytest.mark.parametrize(
    "damaged, text, fix",
    [
        ("study.yaml", "name: [t\n", SPEC_FIX),
        ("study.yaml", b"\xff\xfe", SPEC_FIX),
        ("format.json", '{"format": 2, "vers', FORMAT_FIX),
        ("format.json", '["format"]', FORMAT_FIX),
    ],
)
def test_a_damaged_spec_or_format_file_is_one_line_naming_it(
    store, tmp_path, capsys, damaged, text, fix
):
    path = Path(store.path(damaged))
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    study = tmp_path / "t.yaml"
    study.write_text(yaml.safe_dump(VALID))
    commands = [["study", "run", str(study)], ["study", "resume", "t"]]
    if damaged == "study.yaml":  # status and report read the spec, not the format
        commands += [["study", "status", "t"], ["report", "t"]]
    for command in commands:
        assert main([*command, "--storage", str(tmp_path)]) == 2, command
        assert capsys.readouterr().err.strip() == (
            f"gvae: error: study: {path} is damaged and cannot be read; {fix}, or start the "
            f"study afresh under another name or after removing {store.uri}"
        ), command


def test_a_damaged_lease_is_rewritten_by_its_live_driver_and_keeps_a_second_off(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GVAE_LEASE_SECONDS", "2")  # heartbeats every 0.5 s
    uri = study_uri(str(tmp_path), "t")
    first = StudyLease(uri, "t", log=lambda _: None)
    first.acquire()
    try:
        lease = Path(first.location)
        lease.write_text('{"host": "x", "pi')
        assert first.holder() is None
        time.sleep(1.5)  # a heartbeat or more: it reads the damaged file and writes a whole one
        assert first.holder() is not None and first.holder().token == first.token
        with pytest.raises(GvaeError, match="study: t is already being run by the driver on"):
            StudyLease(uri, "t", log=lambda _: None).acquire()
    finally:
        first.release()
    assert not Path(first.location).exists()


def test_a_damaged_optuna_journal_is_one_line_naming_it(store):
    import optuna

    from analysis.suggestions import optuna_study

    path = store.path(folder.JOURNAL)
    study = optuna.create_study(study_name="t", storage=folder.journal_storage(path))
    for value in (1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    assert [t.value for t in optuna_study(store, "t").trials] == [1.0, 2.0]
    lines = Path(path).read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"  # a line cut short in the middle of the journal
    Path(path).write_text("".join(lines))
    expected = (
        f"study: the Optuna journal {path} is damaged and cannot be read; restore it from a "
        "copy, or start the study afresh under another name"
    )
    for read in (lambda: folder.journal_storage(path), lambda: optuna_study(store, "t")):
        with pytest.raises(GvaeError) as refused:
            read()
        assert str(refused.value) == expected


def asked_and_told(path: str, times: int) -> None:
    """What a resumed search does to its journal: ask for a suggestion and tell its value."""
    import optuna

    study = optuna.load_study(study_name="t", storage=folder.journal_storage(path))
    for _ in range(times):
        trial = study.ask()
        trial.suggest_float("x", 0.0, 1.0)
        study.tell(trial, 1.0)


@pytest.fixture
def torn_journal(store) -> str:
    """A journal of two told trials whose last write (a third trial's) was cut short."""
    import optuna

    path = store.path(folder.JOURNAL)
    optuna.create_study(study_name="t", storage=folder.journal_storage(path))
    asked_and_told(path, 3)
    whole = Path(path).read_bytes()
    Path(path).write_bytes(whole[:-25])
    return path


def test_optuna_cannot_go_on_with_a_journal_whose_last_write_was_cut_short(torn_journal):
    # Why gvae cuts the torn line: Optuna reads past it, then its next ask fails. The day
    # this passes without the cut, folder.cut_torn_tail can go.
    with pytest.raises(AttributeError):  # Optuna 5.1's replay lacks the asked trial
        asked_and_told(torn_journal, 2)


@pytest.mark.parametrize("chunk", [folder.TAIL_CHUNK, 7], ids=["one-read", "many-reads"])
def test_a_journals_torn_last_line_is_cut_and_the_search_goes_on(torn_journal, monkeypatch, chunk):
    import optuna

    monkeypatch.setattr(folder, "TAIL_CHUNK", chunk)
    before = Path(torn_journal).read_bytes()
    said: list[str] = []
    folder.cut_torn_tail(torn_journal, said.append)
    after = Path(torn_journal).read_bytes()
    assert after == before[: before.rindex(b"\n") + 1]
    assert said == [
        f"optuna: {torn_journal} ended in a line cut short by an interrupted write; "
        f"{len(before) - len(after)} bytes dropped"
    ]
    asked_and_told(torn_journal, 2)
    study = optuna.load_study(study_name="t", storage=folder.journal_storage(torn_journal))
    states = [trial.state.name for trial in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "RUNNING", "COMPLETE", "COMPLETE"]
    folder.cut_torn_tail(torn_journal, said.append)  # a whole journal is left as it is
    assert len(said) == 1


def test_a_journal_of_one_torn_line_is_emptied_and_none_is_left_alone(tmp_path):
    torn, said = tmp_path / "torn", []
    torn.write_bytes(b'{"op_code": 0, "worker_id"')
    folder.cut_torn_tail(str(torn), said.append)
    assert torn.read_bytes() == b"" and len(said) == 1
    folder.cut_torn_tail(str(tmp_path / "none"), said.append)
    assert not (tmp_path / "none").exists() and len(said) == 1
