"""IPFIX_BALANCER_CONSOLE*: global keys, checked with the rest of the file."""
import pytest

from ipfix_balancer import config


def parse(text: str) -> config.Config:
    return config.load_text(text, "/etc/x/.env", cpus={0})


def test_console_is_off_unless_set_and_the_token_file_defaults_to_next_to_the_env():
    assert parse("IPFIX_FULLFLOW_PORT=1500\n").console is None
    assert parse("IPFIX_BALANCER_CONSOLE=\n").console is None
    c = parse("IPFIX_BALANCER_CONSOLE=127.0.0.1/8480\n").console
    assert (c.host, c.port, c.token_file, c.tls_cert) == ("127.0.0.1", 8480, "/etc/x/console.token", "")
    assert parse("IPFIX_BALANCER_CONSOLE=[::1]/1\nIPFIX_BALANCER_CONSOLE_TOKEN_FILE=/t\n").console == \
        config.Console("::1", 1, "", "", "/t")
    assert config.Console.from_json(c.to_json()) == c


@pytest.mark.parametrize("text, problem", [
    ("IPFIX_BALANCER_CONSOLE=localhost/8480", "IPFIX_BALANCER_CONSOLE='localhost/8480': expected host/port"),
    ("IPFIX_BALANCER_CONSOLE=127.0.0.1/0", "IPFIX_BALANCER_CONSOLE='127.0.0.1/0': expected host/port"),
    ("IPFIX_BALANCER_CONSOLE=0.0.0.0/8480", "0.0.0.0 is not a loopback address; expected "
     "IPFIX_BALANCER_CONSOLE_TLS_CERT and IPFIX_BALANCER_CONSOLE_TLS_KEY"),
    ("IPFIX_BALANCER_CONSOLE=10.0.0.1/8480\nIPFIX_BALANCER_CONSOLE_TLS_CERT=/nonexistent.pem\n"
     "IPFIX_BALANCER_CONSOLE_TLS_KEY=/nonexistent.key", "IPFIX_BALANCER_CONSOLE_TLS_CERT='/nonexistent.pem': "
     "expected a readable PEM file"),
])
def test_bad_console_settings_are_refused_at_config_time(text, problem):
    with pytest.raises(config.ConfigError) as err:
        parse(text + "\n")
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_non_loopback_console_with_tls_files(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    c = parse(f"IPFIX_BALANCER_CONSOLE=0.0.0.0/8443\nIPFIX_BALANCER_CONSOLE_TLS_CERT={cert}\n"
              f"IPFIX_BALANCER_CONSOLE_TLS_KEY={key}\n").console
    assert (c.host, c.tls_cert, c.tls_key) == ("0.0.0.0", str(cert), str(key))


def test_check_config_names_the_consoles_address_and_token_file(tmp_path):
    from ipfixkit import run_cli
    env = tmp_path / ".env"
    env.write_text("IPFIX_FULLFLOW_PORT=1500\nIPFIX_BALANCER_CONSOLE=[::1]/8480\n")
    done = run_cli("check-config", "--config", env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"  console          http://[::1]:8480/ (token in {tmp_path}/console.token)"
