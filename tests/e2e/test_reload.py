"""Live reconfiguration: exporter sessions stay connected while subreceivers and modes change."""

import json
import socket

from ipfixkit import TcpExporter, TcpSink, decode_records, extract_serials, free_port, make_stream, run_cli, \
    split_messages, wait_until

from ipfix_balancer.control.reload import read_outcome


def env(port: int, mode: str, sinks) -> str:
    subs = ",".join(f"127.0.0.1/{s.port}" for s in sinks)
    return (f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
            f"IPFIX_FULLFLOW_BALANCER[0]={mode}\nIPFIX_FULLFLOW_BALANCER_SUB[0]={subs}\n")


def serials_at(sinks) -> list[int]:
    return sorted(s for sink in sinks for s in extract_serials(sink.messages()))


def test_reload_adds_and_removes_subreceivers_without_dropping_the_exporter(balancer):
    port = free_port()
    with TcpSink() as a, TcpSink() as b, TcpSink() as c:
        bal = balancer(env(port, "RoundRobin", [a, b]))
        bal.wait_ready()
        stream = make_stream(300, records_per_message=5)
        with TcpExporter(port) as exporter:
            exporter.send(stream[:151])  # template + 150 data messages
            assert a.wait_messages(76) and b.wait_messages(76)
            pid = bal.handler_pid("fullflow[0]")

            bal.write_config(env(port, "RoundRobin", [b, c]))  # a removed, c added
            bal.reload()
            bal.wait_log("reconfigured")
            exporter.send(stream[151:])
            assert c.wait_messages(70)
            status = bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 301)
        assert bal.handler_pid("fullflow[0]") == pid, "handler must be reconfigured in place"
        assert status["connections_total"] == 1, "the exporter session was not dropped"
        assert b.wait_quiet() and c.wait_quiet()
        assert serials_at([a, b, c]) == list(range(300 * 5)), "every record exactly once"
        # The new subreceiver got the templates before any data, so all it got decodes.
        assert decode_records(c.messages())
        assert a.connection_count == 1 and c.connection_count == 1


def test_reload_switches_mode_in_place_and_refuses_a_bad_file(balancer):
    port = free_port()
    with TcpSink() as a, TcpSink() as b:
        bal = balancer(env(port, "RoundRobin", [a, b]))
        bal.wait_ready()
        stream = make_stream(100, records_per_message=3)
        with TcpExporter(port) as exporter:
            exporter.send(stream[:51])
            assert a.wait_messages(26) and b.wait_messages(26)
            bal.write_config(env(port, "All", [a, b]))
            bal.reload()
            bal.wait_log("reconfigured")
            exporter.send(stream[51:])
            bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 101)
            assert a.wait_quiet() and b.wait_quiet()
            for sink in (a, b):  # every message after the switch reached both, decodable
                later = [s for s in extract_serials(sink.messages()) if s >= 50 * 3]
                assert later == list(range(50 * 3, 100 * 3))
                assert decode_records(sink.connections[-1] and split_messages(sink.connections[-1]))

            bal.write_config("IPFIX_FULLFLOW_PORT[0]=notaport\n")
            bal.reload()
            bal.wait_log("reload_refused")
            before = len(a.messages())  # (counted before sending: some may arrive before the count)
            exporter.send(make_stream(10, records_per_message=3, first_serial=10**6)[1:])
            assert a.wait_messages(before + 10)
        assert bal.status("fullflow[0]")["connections_total"] == 1


def test_reload_command_prints_the_outcome_of_the_running_supervisors_file(balancer, tmp_path):
    """`reload` reads the file the supervisor runs with (not its own --config default), waits for the
    outcome and prints it; a refused file exits 1 with the problems, and SIGHUP writes the same outcome."""
    port, added = free_port(), free_port()
    with TcpSink() as a:
        bal = balancer(env(port, "RoundRobin", [a]))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        cli_env = {"IPFIX_BALANCER_RUN_DIR": str(bal.run_dir), "IPFIX_BALANCER_CONFIG": str(tmp_path / "absent.env")}

        bal.write_config(env(port, "All", [a]) + f"IPFIX_DNSFLOW_PORT[0]={added}\nIPFIX_DNSFLOW_BIND[0]=127.0.0.1\n")
        done = run_cli("reload", env=cli_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"reloaded {bal.config_path}", "applied in place: fullflow[0]",
                                            "handlers started: dnsflow[0]"]
        assert bal.handler_pid("fullflow[0]") == pid

        good = bal.config_path.read_bytes()
        bal.write_config("IPFIX_FULLFLOW_PORT[0]=notaport\n")
        done = run_cli("reload", env=cli_env)
        assert done.returncode == 1
        assert "reload refused, the running configuration stays" in done.stderr
        assert "IPFIX_FULLFLOW_PORT[0]='notaport': expected a port number 1..65535" in done.stderr

        before = read_outcome(str(bal.run_dir)).generation
        bal.reload()  # SIGHUP, as `kill -HUP` does: the supervisor refuses and says so
        outcome = wait_until(lambda: (o := read_outcome(str(bal.run_dir))) and o.generation > before and o)
        assert outcome.result == "refused" and "notaport" in outcome.problems[0]

        bal.config_path.write_bytes(good)
        bal.reload()
        outcome = wait_until(lambda: (o := read_outcome(str(bal.run_dir))) and o.generation > before + 1 and o)
        assert (outcome.result, outcome.reconfigured, outcome.added) == ("applied", [], [])
        assert bal.handler_pid("fullflow[0]") == pid

    done = run_cli("reload", env={"IPFIX_BALANCER_RUN_DIR": str(tmp_path / "nothing")})
    assert done.returncode == 1 and "supervisor is not running" in done.stderr


def test_reload_to_a_port_that_cannot_be_bound_is_refused_and_the_old_handler_keeps_serving(balancer, tmp_path):
    """Transactional: the new socket is tried before the old handler is stopped; the reload fails with the
    listen error, nothing changes (also not the other receivers' changes), traffic goes on."""
    port = free_port()
    with TcpSink() as a, socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        bal = balancer(env(port, "RoundRobin", [a]))
        bal.wait_ready()
        pid = bal.handler_pid("fullflow[0]")
        cli_env = {"IPFIX_BALANCER_RUN_DIR": str(bal.run_dir)}
        with TcpExporter(port) as exporter:
            stream = make_stream(20, records_per_message=2)
            exporter.send(stream[:11])
            assert a.wait_messages(10)
            bal.write_config(env(taken, "All", [a]) + f"IPFIX_DNSFLOW_PORT[0]={free_port()}\n"
                             "IPFIX_DNSFLOW_BIND[0]=127.0.0.1\n")
            done = run_cli("reload", env=cli_env)
            assert done.returncode == 1, done.stdout
            assert "reload refused, the running configuration stays" in done.stderr
            assert f"fullflow[0]: cannot listen on tcp 127.0.0.1:{taken}: address already in use" in done.stderr
            assert bal.handler_pid("fullflow[0]") == pid
            assert "dnsflow[0]" not in {h["name"] for h in json.loads(
                run_cli("status", "--json", env=cli_env).stdout)["handlers"]}
            exporter.send(stream[11:])
            status = bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] == 21)
        assert status["connections_total"] == 1
        assert a.wait_quiet() and serials_at([a]) == list(range(20 * 2))


def test_supervisor_without_receivers_writes_its_document_and_reloads(balancer):
    """Started with nothing to serve (set it up later in the console): status and reload find it."""
    bal = balancer("IPFIX_BALANCER_HANG_SECONDS=30\n")
    cli_env = {"IPFIX_BALANCER_RUN_DIR": str(bal.run_dir)}
    wait_until(lambda: (bal.run_dir / "supervisor.json").exists())
    port = free_port()
    with TcpSink() as a:
        bal.write_config(env(port, "All", [a]))
        done = run_cli("reload", env=cli_env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"reloaded {bal.config_path}", "handlers started: fullflow[0]"]
