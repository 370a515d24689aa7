"""The console runs in its own process, which the supervisor restarts when it dies and stops with itself."""
import shutil
import re
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest

from ipfixkit import free_port, wait_until


def console_pids(bal) -> list[int]:
    pids = []
    for p in psutil.Process(bal.pid).children():
        try:
            if "console" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:  # gone, or a zombie not reaped yet
            pass
    return pids


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def with_console(balancer, tmp_path) -> tuple:
    """A running balancer with a console that answers: (balancer, receiver port, console port)."""
    port, console = free_port(), free_port()
    bal = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                   f"IPFIX_BALANCER_CONSOLE=127.0.0.1/{console}\n"
                   f"IPFIX_BALANCER_CONSOLE_TOKEN_FILE={tmp_path / 'token'}\n")
    bal.wait_ready()
    wait_until(lambda: answers(console), "the console to answer", bal)
    return bal, port, console


def test_console_process_is_restarted_when_it_dies_or_the_supervisor_restarts_and_stops_when_turned_off(balancer, tmp_path):
    bal, port, console = with_console(balancer, tmp_path)
    handler = bal.handler_pid("fullflow[0]")
    [first] = console_pids(bal)
    assert first not in {h["pid"] for h in bal.supervisor()["handlers"]}  # not a handler, not the supervisor
    psutil.Process(first).send_signal(signal.SIGKILL)
    wait_until(lambda: (pids := console_pids(bal)) and pids != [first] and answers(console),
               "a new console process", bal, timeout=30)
    assert bal.handler_pid("fullflow[0]") == handler
    bal.wait_log(lambda line: line.get("event") == "handler_died" and line.get("handler") == "console")

    [second] = console_pids(bal)  # a restart in place frees the console's port for the new supervisor's console
    bal.send_signal(signal.SIGUSR2)
    wait_until(lambda: (pids := console_pids(bal)) and pids != [second] and answers(console),
               "the console after a restart in place", bal, timeout=30)

    bal.write_config(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n")  # console off
    bal.reload()
    wait_until(lambda: not console_pids(bal) and not answers(console), "the console to stop", bal)
    assert bal.stop() == 0


def test_a_console_port_in_use_is_one_plain_log_line_and_the_handlers_run(balancer, tmp_path):
    port, console = free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", console))
        holder.listen()
        bal = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                       f"IPFIX_BALANCER_CONSOLE=127.0.0.1/{console}\n"
                       f"IPFIX_BALANCER_CONSOLE_TOKEN_FILE={tmp_path / 'token'}\n")
        bal.wait_ready()
        line = bal.wait_log("console_not_started")
        assert line["reason"] == f"cannot listen on 127.0.0.1/{console}: Address already in use"
        assert "Traceback" not in bal.log_text()


def test_console_with_tls_serves_https_with_a_secure_cookie(balancer, tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port, console = free_port(), free_port()
    bal = balancer(f"IPFIX_FULLFLOW_PORT[0]={port}\nIPFIX_FULLFLOW_BIND[0]=127.0.0.1\n"
                   f"IPFIX_BALANCER_CONSOLE=127.0.0.1/{console}\nIPFIX_BALANCER_CONSOLE_TLS_CERT={cert}\n"
                   f"IPFIX_BALANCER_CONSOLE_TLS_KEY={key}\nIPFIX_BALANCER_CONSOLE_TOKEN_FILE={tmp_path / 'token'}\n")
    bal.wait_ready()
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    def login_page():
        try:
            return urllib.request.urlopen(f"https://127.0.0.1:{console}/login", timeout=2, context=context)
        except OSError:
            return None
    answer = wait_until(login_page, "the console to answer over TLS", bal)
    assert "set-cookie" not in answer.headers  # no session before a login
    csrf = re.search(r'name="csrf" value="([^"]+)"', answer.read().decode()).group(1)
    token = (tmp_path / "token").read_text().strip()

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None
    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))
    body = urllib.parse.urlencode({"csrf": csrf, "token": token}).encode()
    with pytest.raises(urllib.error.HTTPError) as login:  # 303 to /receivers, not followed
        opener.open(f"https://127.0.0.1:{console}/login", data=body, timeout=5)
    assert login.value.code == 303
    cookie = login.value.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_a_huge_unauthenticated_post_is_refused_without_the_console_growing(balancer, tmp_path):
    """Issue 20: a 300 MB POST /login was buffered whole (RSS 38 -> 335 MB). Now 413 at the header."""
    bal, _port, console = with_console(balancer, tmp_path)
    [pid] = console_pids(bal)
    before = psutil.Process(pid).memory_info().rss
    chunk = b"x" * (1 << 20)
    for head in (b"Content-Length: 314572800\r\n", b"Transfer-Encoding: chunked\r\n"):
        with socket.create_connection(("127.0.0.1", console), timeout=10) as s:
            s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n" + head
                      + b"\r\n")
            sent = 0
            try:
                for _ in range(50):  # up to 50 MB, until the console closes
                    s.sendall(chunk if b"Length" in head else b"100000\r\n" + chunk + b"\r\n")
                    sent += 1
            except OSError:
                pass
            s.settimeout(10)
            answer = s.recv(200)
        assert answer.startswith(b"HTTP/1.1 413") and sent < 50, (answer, sent)
    assert psutil.Process(pid).memory_info().rss - before < 20 * 2**20
    assert console_pids(bal) == [pid] and answers(console)
