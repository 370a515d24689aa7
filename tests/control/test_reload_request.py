"""control/reload.py: the outcome document, and a request as ``ipfix-balancer reload`` makes it (the supervisor
faked by a ``kill`` that writes its outcome, so no process is signalled)."""

import os

import pytest

from ipfix_balancer import config
from ipfix_balancer.config.host import LocalHost
from ipfix_balancer.control import reload, rundir
from ipfix_balancer.control.status import SupervisorStatus


@pytest.fixture
def running(tmp_path, monkeypatch):
    """A run dir whose supervisor (this process, by the faked checks) reads ``balancer.env``."""
    monkeypatch.setattr(LocalHost, "local_addresses", lambda _self: set())
    env = tmp_path / "balancer.env"
    env.write_text("IPFIX_FULLFLOW_PORT[0]=1500\n")
    rundir.write_json(rundir.supervisor_status_path(str(tmp_path)),
                      SupervisorStatus(pid=os.getpid(), config=str(env), handlers=[]).to_dict())
    monkeypatch.setattr(reload, "supervisor_pid", lambda _run_dir: 4242)
    return tmp_path, env


def test_outcome_lines_say_what_changed_or_why_nothing_did():
    applied = reload.Outcome(3, reload.APPLIED, "/e.env", reconfigured=["fullflow[0]"], added=["dnsflow[0]"])
    assert applied.lines() == ["reloaded /e.env", "applied in place: fullflow[0]", "handlers started: dnsflow[0]"]
    assert reload.Outcome(4, reload.APPLIED, "/e.env").lines() == ["reloaded /e.env", "no change"]
    refused = reload.Outcome(5, reload.REFUSED, "/e.env", problems=["IPFIX_X: unknown key"])
    assert refused.lines() == ["reload refused, the running configuration stays: /e.env: 1 problem(s):",
                               "  - IPFIX_X: unknown key"]


def test_an_outcome_round_trips_and_one_of_another_release_reads_with_known_keys(tmp_path):
    outcome = reload.Outcome(7, reload.APPLIED, "/e.env", restarted=["fullflow[1]"])
    reload.write_outcome(str(tmp_path), outcome)
    assert reload.read_outcome(str(tmp_path)) == outcome
    rundir.write_json(rundir.reload_outcome_path(str(tmp_path)), {"generation": 8, "result": "applied",
                                                                  "config": "/e.env", "later_key": 1})
    assert reload.read_outcome(str(tmp_path)) == reload.Outcome(8, reload.APPLIED, "/e.env")
    rundir.write_json(rundir.reload_outcome_path(str(tmp_path)), {"result": "applied"})  # no generation
    assert reload.read_outcome(str(tmp_path)) is None


def test_no_supervisor_no_request(tmp_path, monkeypatch):
    monkeypatch.setattr(reload, "supervisor_pid", lambda _run_dir: None)
    with pytest.raises(reload.NotRunning):
        reload.request(str(tmp_path), timeout=1)


def test_a_file_that_does_not_validate_is_refused_without_a_signal(running, monkeypatch):
    run_dir, env = running
    env.write_text("IPFIX_FULLFLOW_PORT[0]=not-a-port\n")
    monkeypatch.setattr(reload.os, "kill", lambda *_: pytest.fail("signalled"))
    outcome = reload.request(str(run_dir), timeout=1)
    assert outcome.result == reload.REFUSED and outcome.config == str(env) and outcome.problems


def test_a_request_signals_the_supervisor_and_waits_for_a_newer_outcome(running, monkeypatch):
    run_dir, env = running
    reload.write_outcome(str(run_dir), reload.Outcome(4, reload.APPLIED, str(env)))
    signalled = []

    def supervisor_answers(pid, sig):
        signalled.append((pid, sig))
        reload.write_outcome(str(run_dir), reload.Outcome(5, reload.APPLIED, str(env), added=["fullflow[0]"]))
    monkeypatch.setattr(reload.os, "kill", supervisor_answers)
    outcome = reload.request(str(run_dir), timeout=5)
    assert signalled == [(4242, reload.signal.SIGHUP)] and (outcome.generation, outcome.added) == (5, ["fullflow[0]"])


def test_a_supervisor_that_never_answers_times_out(running, monkeypatch):
    run_dir, _env = running
    monkeypatch.setattr(reload.os, "kill", lambda *_: None)
    with pytest.raises(TimeoutError):
        reload.request(str(run_dir), timeout=0.3)


def test_systemds_main_pid_is_believed_only_when_it_holds_the_run_dir_lock(running, monkeypatch):
    run_dir, env = running
    monkeypatch.setattr(rundir, "lock_holder", lambda _run_dir: 777)
    assert reload.running_config(str(run_dir), main_pid=777) == str(env)
    with pytest.raises(reload.NotRunning):
        reload.running_config(str(run_dir), main_pid=778)


@pytest.mark.parametrize("text", ["[]", "1", "null", '{"generation": "7", "result": "applied", "config": "/e.env"}',
                                  '{"generation": true, "result": "applied", "config": "/e.env"}',
                                  '{"generation": 7, "result": "applied", "config": "/e.env", "added": 1}',
                                  '{"generation": 7, "result": "refused", "config": "/e.env", "problems": [1]}'])
def test_an_outcome_that_does_not_read_as_one_is_none_and_a_request_goes_on(running, monkeypatch, text):
    """A bad reload.json (a bug, another release, tampering) reads as none: a generation that is not an int
    broke the wait for a newer outcome (and the supervisor's numbering); a list that is not of strings, read
    as the newer outcome, would break the ``reload`` output."""
    run_dir, env = running
    rundir.write_atomic(rundir.reload_outcome_path(str(run_dir)), text)
    assert reload.read_outcome(str(run_dir)) is None
    monkeypatch.setattr(reload.os, "kill", lambda *_: reload.write_outcome(
        str(run_dir), reload.Outcome(1, reload.APPLIED, str(env), added=["fullflow[0]"])))
    outcome = reload.request(str(run_dir), timeout=5)
    assert outcome.lines() == [f"reloaded {env}", "handlers started: fullflow[0]"]
