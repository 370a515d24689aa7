"""control/rundir.py: the run-directory names every process agrees on, and atomic JSON documents."""
import os

import pytest

from ipfix_balancer.control import rundir


def test_handler_file_names():
    assert rundir.handler_status_path("/run/b", "FULLFLOW", 1) == "/run/b/handler-fullflow-1.json"


def test_supervisor_file_names():
    """The names docs/operations.md and README give operators, one per path function."""
    paths = (rundir.supervisor_pid_path, rundir.supervisor_status_path, rundir.adopt_path, rundir.lock_path,
             rundir.supervisor_carry_path, rundir.reload_outcome_path, rundir.log_ring_path)
    assert [path("/r") for path in paths] == [
        "/r/supervisor.pid", "/r/supervisor.json", "/r/supervisor.adopt.json", "/r/supervisor.lock",
        "/r/supervisor.carry.json", "/r/reload.json", "/r/log.jsonl"]


def test_status_files_are_found_and_handler_files_removable(tmp_path):
    for name in ("handler-fullflow-0.json", "handler-fullflow-0.next", "handler-dnsflow-2.json",
                 ".handler-dnsflow-2.json.k3x9", "supervisor.json", ".supervisor.json.a1b2"):
        (tmp_path / name).write_text("{}")
    run = str(tmp_path)
    assert rundir.handler_status_paths(run) == [rundir.handler_status_path(run, "DNSFLOW", 2),
                                                rundir.handler_status_path(run, "FULLFLOW", 0)]
    assert sorted(os.path.basename(p) for p in rundir.handler_files(run)) == [
        ".handler-dnsflow-2.json.k3x9", "handler-dnsflow-2.json", "handler-fullflow-0.json", "handler-fullflow-0.next"]


def test_json_documents_are_replaced_whole(tmp_path):
    path = str(tmp_path / "doc.json")
    assert rundir.read_json(path) is None
    rundir.write_json(path, {"a": [1, 2]})
    rundir.write_json(path, {"b": 3})
    assert rundir.read_json(path) == {"b": 3} and os.listdir(tmp_path) == ["doc.json"]
    (tmp_path / "doc.json").write_text('{"cut')
    assert rundir.read_json(path) is None


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "null"])
def test_a_json_document_that_is_not_an_object_counts_as_not_json(tmp_path, text):
    """The run dir is a hostile input path (another local user, a truncated write by an old version): its
    readers index what they read as an object."""
    path = tmp_path / "supervisor.json"
    path.write_text(text)
    assert rundir.load_json(str(path)) is None and rundir.read_json(str(path)) is None


def test_resolve_run_dir_precedence(monkeypatch):
    monkeypatch.delenv("IPFIX_BALANCER_RUN_DIR", raising=False)
    assert rundir.resolve_run_dir(None) == rundir.DEFAULT_RUN_DIR == "/run/fast_ipfix_balancer"
    monkeypatch.setenv("IPFIX_BALANCER_RUN_DIR", "/env")
    assert rundir.resolve_run_dir(None) == "/env" and rundir.resolve_run_dir("/cli") == "/cli"


def test_a_symlink_in_the_run_dir_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    run = tmp_path / "run"
    rundir.secure(str(run))
    (run / "supervisor.json").symlink_to(victim)
    rundir.write_json(str(run / "supervisor.json"), {"a": 1})
    assert victim.read_text() == "keep" and rundir.read_json(str(run / "supervisor.json")) == {"a": 1}
    assert (run / "supervisor.json").stat().st_mode & 0o777 == 0o640 and sorted(os.listdir(run)) == ["supervisor.json"]


def test_run_dir_is_made_private_and_a_loose_or_foreign_one_refused(tmp_path):
    run = tmp_path / "run"
    rundir.secure(str(run))
    assert run.stat().st_mode & 0o777 == 0o700
    run.chmod(0o770)
    with pytest.raises(rundir.RunDirError, match="writable by group or others"):
        rundir.secure(str(run))
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(rundir.RunDirError, match="not a directory"):
        rundir.secure(str(tmp_path / "link"))


def test_the_lock_is_exclusive_and_its_holder_known(tmp_path):
    run = str(tmp_path)
    assert rundir.lock_holder(run) is None
    fd = rundir.lock(run)
    try:
        assert rundir.lock(run) is None and rundir.lock_holder(run) == os.getpid()
    finally:
        os.close(fd)
    assert rundir.lock_holder(run) is None


SAMPLES = list[tuple[str, list[tuple[str, str]], float]]


@pytest.mark.parametrize("value, kind, ok", [
    (3, int, True), (True, int, False), ("3", int, False), (2.5, float, True), (2, float, True), (False, float, False),
    (None, int | None, True), ("x", int | None, False), ([1, [2, 3]], list[int | tuple[int, int]], True),
    ([[2]], list[int | tuple[int, int]], False), ({"a": 1}, list[int], False),
    ([["n", [["k", "v"]], 1.5]], SAMPLES, True), ([["n", [["k", 1]], 1]], SAMPLES, False),
    ([["n", [], "1"]], SAMPLES, False), ({"pid": 1, "fd": None}, {"pid": int, "fd": int | None}, True),
    ({"pid": 1}, {"pid": int, "fd": int | None}, True), ({"fd": 1}, {"pid": int, "fd": int | None}, False),
    ([1], {"pid": int}, False)])
def test_a_value_conforms_to_a_type_the_way_json_can_hold_it(value, kind, ok):
    assert rundir.conforms(value, kind) is ok


def test_named_entries_of_another_type_are_left_out_with_the_reason():
    assert rundir.entries({"r": {"a": 1, "b": "x"}}, "r", int) == (
        {"a": 1}, ['r: b: not as this release writes it: "x"'])
    assert rundir.entries({"r": [1]}, "r", int) == ({}, ["r: not a JSON object: [1]"])
    assert rundir.entries({}, "r", int) == ({}, [])


def test_the_lock_held_across_exec_is_found_also_when_its_noted_descriptor_is_wrong(tmp_path):
    run = str(tmp_path)
    assert rundir.inherited_lock(run, None) is None  # no lock file: none
    fd = rundir.lock(run)
    try:
        for noted in (fd, None, "x", 0, -1, 2 ** 70):
            assert rundir.inherited_lock(run, noted) == fd
    finally:
        os.close(fd)
    with open(os.devnull) as other:
        assert rundir.inherited_lock(run, other.fileno()) is None  # the lock file exists, no descriptor of ours
