"""Self-tests of the shared test kit (no product needed)."""
import socket
import time

import pytest
from scapy.layers.netflow import NetflowDataflowsetV9, NetflowHeader, NetflowHeaderV10

from ipfixkit import (
    FULLFLOW_FIELDS,
    MESSAGE_HEADER,
    SET_HEADER,
    Balancer,
    BalancerError,
    TcpExporter,
    TcpSink,
    UdpSink,
    UnknownTemplateError,
    data_message,
    decode_records,
    extract_serials,
    free_port,
    header,
    make_stream,
    record_length,
    run_cli,
    set_ids,
    split_messages,
    status_filename,
    stream_serials,
    tcp_send,
    template_message,
    udp_send,
)

# --------------------------------------------------------------------------- #
# Encoding and decoding
# --------------------------------------------------------------------------- #


def test_stream_decodes_back_to_serials():
    msgs = make_stream(5, records_per_message=7, odid=3, first_serial=100, export_time=1_700_000_000)
    assert len(msgs) == 6
    assert set_ids(msgs[0]) == [2]
    assert all(set_ids(m) == [256] for m in msgs[1:])
    records = decode_records(msgs)
    assert [r["serial"] for r in records] == stream_serials(5, 7, first_serial=100)
    first = records[0]
    assert first["odid"] == 3 and first["template_id"] == 256 and not first["undecodable"]
    assert first["sourceIPv4Address"] == "10.0.0.1"
    assert first["destinationTransportPort"] == 443
    assert first["protocolIdentifier"] == 6
    assert first["flowEndMilliseconds"] == 1_700_000_001_000


def test_headers_and_sequence_numbers():
    msgs = make_stream(4, records_per_message=3, odid=9, first_seq=10, export_time=1234)
    for msg in msgs:
        assert header(msg)[1] == len(msg)   # scapy's own length would be 2 short
    assert [header(m) for m in msgs] == [
        (10, len(msgs[0]), 1234, 10, 9),
        (10, len(msgs[1]), 1234, 10, 9),
        (10, len(msgs[2]), 1234, 13, 9),
        (10, len(msgs[3]), 1234, 16, 9),
        (10, len(msgs[4]), 1234, 19, 9),
    ]
    assert {r["seq"] for r in decode_records(msgs) if r["msg_index"] == 2} == {13}


def test_template_message_is_what_scapy_reads():
    pkt = NetflowHeader(template_message(odid=5, seq=42, template_id=300, export_time=99))
    hdr = pkt[NetflowHeaderV10]
    assert (pkt.version, hdr.length, hdr.ExportTime, hdr.flowSequence, hdr.ObservationDomainID) == (10, 60, 99, 42, 5)
    tmpl = pkt.templates[0]
    assert tmpl.templateID == 300
    assert [(f.fieldType, f.fieldLength) for f in tmpl.template_fields] == [(f.ie, f.length) for f in FULLFLOW_FIELDS]


@pytest.mark.parametrize("serials", [[0], [1, 2, 3], list(range(2**40, 2**40 + 31))])
def test_fast_records_equal_scapy_records(serials):
    fast = data_message(serials, odid=2, seq=7, export_time=5)
    slow = data_message(serials, odid=2, seq=7, export_time=5, via_scapy=True)
    assert fast == slow
    assert len(fast) == MESSAGE_HEADER.size + SET_HEADER.size + len(serials) * record_length()
    # make_stream's own packing matches data_message too
    stream = make_stream(1, records_per_message=len(serials), odid=2, first_serial=serials[0], first_seq=7,
                         export_time=5)
    if serials == list(range(serials[0], serials[0] + len(serials))):
        assert stream[1] == fast


def test_scapy_alone_decodes_the_fast_path():
    msgs = make_stream(2, records_per_message=4, first_serial=50)
    pkt = NetflowHeader(msgs[1])
    assert pkt[NetflowDataflowsetV9].templateID == 256
    from scapy.layers.netflow import netflowv9_defragment
    netflowv9_defragment([NetflowHeader(msgs[0]), pkt])
    assert [r.IN_BYTES for r in pkt[NetflowDataflowsetV9].records] == [50, 51, 52, 53]


def test_bulk_generation_is_fast():
    start = time.perf_counter()
    msgs = make_stream(20_000, records_per_message=10)
    elapsed = time.perf_counter() - start
    assert len(msgs) == 20_001
    assert elapsed < 0.5, f"20k messages took {elapsed:.3f}s"
    assert extract_serials(msgs[-3:]) == list(range(199_970, 200_000))


@pytest.mark.parametrize("target", [200, 1400, 8000])
def test_target_sizes_roughly_honoured(target):
    msgs = make_stream(3, target_size=target)
    for msg in msgs[1:]:
        assert abs(len(msg) - target) <= record_length() / 2 + 1
        assert header(msg)[1] == len(msg)
    assert len(decode_records(msgs)) == 3 * ((len(msgs[1]) - 20) // record_length())


def test_split_messages_on_concatenation():
    msgs = make_stream(10, target_size=200) + make_stream(3, target_size=8000, odid=2)
    data = b"".join(msgs)
    assert split_messages(data) == msgs
    assert split_messages(bytearray(data)) == msgs
    with pytest.raises(ValueError, match="trailing"):
        split_messages(data[:-5])
    assert split_messages(data[:-5], partial_ok=True) == msgs[:-1]
    assert split_messages(data[:3], partial_ok=True) == []
    with pytest.raises(ValueError, match="version"):
        split_messages(data[1:])


def test_extract_serials_agrees_with_scapy():
    msgs = make_stream(6, records_per_message=5, first_serial=1000)
    assert extract_serials(msgs) == [r["serial"] for r in decode_records(msgs)] == stream_serials(6, 5, 1000)


def test_data_without_template_is_flagged():
    msgs = make_stream(2, records_per_message=3)
    with pytest.raises(UnknownTemplateError) as err:
        decode_records(msgs[1:])
    assert [(m["msg_index"], m["template_id"]) for m in err.value.missing] == [(0, 256), (1, 256)]
    records = decode_records(msgs[1:], strict=False)
    assert records and all(r["undecodable"] for r in records)
    assert len(records[0]["raw"]) == 3 * record_length()


def test_templates_are_per_odid():
    # A template for ODID 1 does not decode ODID 2's data.
    msgs = [template_message(odid=1), data_message([1, 2], odid=1), data_message([3], odid=2)]
    records = decode_records(msgs, strict=False)
    assert [(r["odid"], r["undecodable"]) for r in records] == [(1, False), (1, False), (2, True)]


def test_data_before_its_template_is_flagged():
    msgs = make_stream(1, records_per_message=2)
    records = decode_records([msgs[1], msgs[0], msgs[1]], strict=False)
    assert [r["undecodable"] for r in records] == [True, False, False]


# --------------------------------------------------------------------------- #
# Loopback peers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("chunking", [None, "message", 7, "random"])
def test_tcp_sink_receives_tcp_send(tcp_sink, chunking):
    msgs = make_stream(50, target_size=1400)
    tcp_send(tcp_sink.port, msgs, chunking)
    assert tcp_sink.wait_messages(len(msgs))
    assert tcp_sink.messages() == msgs
    assert tcp_sink.data == b"".join(msgs)
    assert tcp_sink.errors == []


def test_tcp_sink_keeps_connections_apart(tcp_sink):
    first, second = make_stream(3, odid=1), make_stream(4, odid=2)
    with TcpExporter(tcp_sink.port) as a, TcpExporter(tcp_sink.port) as b:
        a.send(first[:2])
        assert tcp_sink.wait_messages(2)
        b.send(second)
        a.send(first[2:])
        assert tcp_sink.wait_messages(len(first) + len(second))
    assert tcp_sink.connections == [b"".join(first), b"".join(second)]
    assert tcp_sink.messages() == first + second
    assert tcp_sink.connection_count == 2
    assert tcp_sink.peers[0][0] == "127.0.0.1"


def test_tcp_sink_partial_message_not_counted(tcp_sink):
    msgs = make_stream(1)
    with TcpExporter(tcp_sink.port) as exporter:
        exporter.send([msgs[0], msgs[1][:10]])
        assert tcp_sink.wait_bytes(len(msgs[0]) + 10)
        assert tcp_sink.message_count == 1
        assert tcp_sink.messages() == msgs[:1]
        assert not tcp_sink.wait_messages(2, timeout=0.2)
        exporter.send([msgs[1][10:]])
        assert tcp_sink.wait_messages(2)


def test_tcp_sink_down_then_up_on_fixed_port():
    port = free_port()
    with TcpSink(port=port, up=False) as sink:
        assert sink.port == port and not sink.is_up
        with pytest.raises(ConnectionRefusedError):
            tcp_send(port, make_stream(1))
        sink.up()
        msgs = make_stream(2)
        tcp_send(port, msgs)
        assert sink.wait_messages(3)
        sink.down()
        with pytest.raises(ConnectionRefusedError):
            tcp_send(port, msgs)
        sink.up()
        tcp_send(port, msgs)
        assert sink.wait_messages(6)
        assert sink.messages() == msgs + msgs
        assert sink.connection_count == 2


def test_tcp_sink_drop_connections(tcp_sink):
    with TcpExporter(tcp_sink.port) as exporter:
        exporter.send(make_stream(1))
        assert tcp_sink.wait_messages(2)
        assert tcp_sink.open_connections == 1
        assert tcp_sink.drop_connections() == 1
        exporter.sock.settimeout(5)
        assert exporter.sock.recv(10) == b""      # peer closed
        assert tcp_sink.open_connections == 0
    assert tcp_sink.is_up
    tcp_send(tcp_sink.port, make_stream(1))      # still listening
    assert tcp_sink.wait_messages(4)


def test_tcp_sink_pause_holds_data_back(tcp_sink):
    tcp_sink.pause()
    msgs = make_stream(5)
    tcp_send(tcp_sink.port, msgs)
    assert not tcp_sink.wait_messages(1, timeout=0.3)
    tcp_sink.resume()
    assert tcp_sink.wait_messages(len(msgs))
    assert tcp_sink.messages() == msgs


def test_wait_quiet(tcp_sink):
    tcp_send(tcp_sink.port, make_stream(1))
    assert tcp_sink.wait_messages(2)
    assert tcp_sink.wait_quiet(0.2, timeout=2)


def test_sink_records_malformed_input(tcp_sink):
    tcp_send(tcp_sink.port, [b"\x00\x09\x00\x10" + bytes(12)])
    assert tcp_sink.wait_bytes(16)
    assert tcp_sink.message_count == 0
    assert tcp_sink.errors and "version=9" in tcp_sink.errors[0]


def test_udp_sink_receives_udp_send(udp_sink):
    msgs = make_stream(200, target_size=1400)
    src = free_port("udp")
    assert udp_send(udp_sink.port, msgs, src_port=src) == src
    assert udp_sink.wait_messages(len(msgs))
    assert udp_sink.datagrams == msgs
    assert udp_sink.messages() == msgs
    assert set(udp_sink.peers) == {("127.0.0.1", src)}
    assert udp_sink.endpoint == f"127.0.0.1/{udp_sink.port}/udp"


def test_udp_sink_down_then_up():
    port = free_port("udp")
    with UdpSink(port=port, up=False) as sink:
        udp_send(port, make_stream(1))
        assert not sink.wait_messages(1, timeout=0.2)
        sink.up()
        msgs = make_stream(3, target_size=8000)
        udp_send(port, msgs)
        assert sink.wait_messages(len(msgs))
        assert sink.messages() == msgs


def test_udp_sink_pause_resume(udp_sink):
    udp_sink.pause()
    msgs = make_stream(3)
    udp_send(udp_sink.port, msgs)
    assert not udp_sink.wait_messages(1, timeout=0.2)
    udp_sink.resume()
    assert udp_sink.wait_messages(len(msgs))
    assert udp_sink.messages() == msgs


def test_free_port_is_bindable():
    for kind, socktype in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        with socket.socket(socket.AF_INET, socktype) as s:
            s.bind(("127.0.0.1", free_port(kind)))


# --------------------------------------------------------------------------- #
# Balancer harness, against a stand-in product
# --------------------------------------------------------------------------- #

FAKE_PRODUCT = '''
import argparse, json, os, signal, socket, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("cmd")
parser.add_argument("--config")
parser.add_argument("--run-dir")
parser.add_argument("--log-format")
a = parser.parse_args()
if a.cmd != "run":
    print("usage: fake run", file=sys.stderr)
    sys.exit(2)
conf = dict(line.split("=", 1) for line in open(a.config).read().split())
if conf.get("FAIL"):
    print("config error: FAIL is set", flush=True)
    sys.exit(3)
def write(name, obj):
    tmp = os.path.join(a.run_dir, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.rename(tmp, os.path.join(a.run_dir, name))
os.makedirs(a.run_dir, exist_ok=True)
print(json.dumps({"event": "starting", "config": a.config}), flush=True)
print("a line that is not JSON", flush=True)
sock = socket.socket()
sock.bind(("127.0.0.1", int(conf["PORT"])))
sock.listen()
pid = os.getpid()
write("supervisor.json", {"pid": pid, "config": a.config,
      "handlers": [{"name": "fullflow[0]", "stream": "FULLFLOW", "index": 0, "pid": pid, "restarts": 0}]})
time.sleep(0.3)
def stop(*_):
    print(json.dumps({"event": "stopped"}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
n = 0
while True:
    write("handler-fullflow-0.json", {"stream": "FULLFLOW", "index": 0, "name": "fullflow[0]", "pid": pid,
          "listen": {"proto": "tcp", "bind": "127.0.0.1", "port": int(conf["PORT"]), "listening": True},
          "msgs_in": n})
    n += 1
    time.sleep(0.1)
'''


@pytest.fixture
def fake_product(tmp_path):
    pkg = tmp_path / "fake" / "fakebal"
    pkg.mkdir(parents=True)
    (pkg / "__main__.py").write_text(FAKE_PRODUCT)
    return {"module": "fakebal", "env": {"PYTHONPATH": str(tmp_path / "fake")}}


def test_status_filename():
    assert status_filename("fullflow[0]") == "handler-fullflow-0.json"
    assert status_filename("DNSFLOW[12]") == "handler-dnsflow-12.json"
    with pytest.raises(ValueError):
        status_filename("fullflow0")


def test_balancer_harness_lifecycle(tmp_path, fake_product):
    port = free_port()
    with Balancer(tmp_path, f"""
        PORT={port}
    """, **fake_product) as bal:
        assert bal.config_path.read_text() == f"PORT={port}\n"
        ready = bal.wait_ready(timeout=10)
        assert ready["fullflow[0]"]["listen"]["port"] == port
        assert bal.handler_pid("fullflow[0]") == bal.pid
        assert bal.supervisor()["handlers"][0]["stream"] == "FULLFLOW"
        assert bal.wait_status("fullflow[0]", lambda s: s["msgs_in"] >= 3)["msgs_in"] >= 3
        assert bal.wait_log("starting")["config"] == str(bal.config_path)
        assert all(isinstance(line, dict) for line in bal.logs())
        assert bal.stop() == 0
        assert bal.orphans == []
        assert bal.logs()[-1]["event"] == "stopped"
        assert "not JSON" in bal.log_text()


def test_balancer_harness_reports_early_exit(tmp_path, fake_product):
    bal = Balancer(tmp_path, "FAIL=1\n", **fake_product)
    with bal, pytest.raises(BalancerError, match="exited with 3") as err:
        bal.wait_ready(timeout=10)
    assert "config error" in str(err.value)
    assert bal.wait_exit() == 3


def test_run_cli(fake_product):
    done = run_cli("bogus", **fake_product)
    assert done.returncode == 2 and "usage" in done.stderr
