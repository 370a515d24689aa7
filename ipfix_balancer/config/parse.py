""".env reading and per-key parsing: the operator's file turned into the settings model (``model``).

Every other module receives these objects, never raw strings, so all checking happens here (with ``checks``
for what spans receivers): an operator who mistypes a key or a value gets one message per problem, all at
once, before anything listens. What a check must ask of the machine goes through ``host``.
"""
from __future__ import annotations

import difflib
import io
import ipaddress
import os
import re
from collections.abc import Collection, Mapping

from dotenv.parser import parse_stream

from . import checks
from .derive import default_memory_bytes
from .host import LOCAL, Host, IPAddress, ip_or_none
from .model import STREAMS, Config, Console, Endpoint, ForwardingSettings, Limits, Listen, Mode, ReceiverConfig, \
    Recording, TemplateLimits

DEFAULT_CONFIG_PATH = "/var/fast_ipfix_balancer/backend/.env"
DUMP_ROOT = "/var/fast_ipfix_balancer/dump"

# Environment variables that share the IPFIX_ prefix; they never configure a receiver.
_ENV_ONLY = frozenset({"IPFIX_BALANCER_CONFIG", "IPFIX_BALANCER_RUN_DIR"})
# Global .env keys (not per receiver): key -> param, parsed with the receivers' checks.
_GLOBALS = {"IPFIX_BALANCER_METRICS": "METRICS", "IPFIX_BALANCER_HANG_SECONDS": "HANG_SECONDS",
            "IPFIX_BALANCER_METRICS_TOKEN_FILE": "METRICS_TOKEN_FILE"}
# Global keys of the web console (console/): one per balancer, not per receiver.
_CONSOLE_KEYS = ("IPFIX_BALANCER_CONSOLE", "IPFIX_BALANCER_CONSOLE_TLS_CERT", "IPFIX_BALANCER_CONSOLE_TLS_KEY",
                 "IPFIX_BALANCER_CONSOLE_TOKEN_FILE")
CONSOLE_TOKEN_NAME = "console.token"  # default token file: next to the .env
_PARAMS = ("PORT_TYPE", "PORT", "BIND", "ROTATE_MINUTES", "ROTATE_DELAY_SECONDS", "FW_MAX_QUEUE_SIZE",
           "DUMP_INSERT_PROCESSES", "DPI_ID", "BALANCER", "BALANCER_SUB", "BALANCER_SUB_PROTO",
           "BALANCER_TASKSET", "TASKSET", "QUEUE_BYTES", "TEMPLATE_REFRESH", "DUMP_DIR", "BALANCER_AUTO",
           "SPOOL_BYTES", "TEMPLATES_MAX", "ODIDS_MAX", "TEMPLATE_BYTES_MAX", "STALL_SECONDS",
           "DRAIN_SECONDS", "BALANCER_SUB_SOURCE", "ALLOW", "IDLE_TIMEOUT", "MAX_SESSIONS", "MAX_SESSIONS_PER_SOURCE", "MEMORY_BYTES",
           "RCVBUF_BYTES")
_ALIASES = {"TASKSET": "BALANCER_TASKSET"}  # the manual uses both names
_KEY_RE = re.compile(rf"IPFIX_(?P<stream>{'|'.join(STREAMS)})_(?P<param>{'|'.join(_PARAMS)})"
                     r"(?:\[(?P<index>[0-9]{1,9})\])?")
_ALL_KEYS = [f"IPFIX_{s}_{p}" for s in STREAMS for p in _PARAMS]
# One list item: host/port or host/port/proto; IPv6 hosts in brackets because ':' is part of them.
_ITEM_RE = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^/\[\]]*))/(?P<port>[^/]*)(?:/(?P<proto>[^/]*))?")
_NO_DNS = "hostnames are not resolved: the balancer must not depend on DNS at start"

_DEFAULT_PORT = {"FULLFLOW": 1500, "CLICKSTREAM": 1501, "DNSFLOW": 1502}
_DEFAULT_ROTATE_MINUTES = {"FULLFLOW": 10, "CLICKSTREAM": 12, "DNSFLOW": 10}
_INTS = {  # param: (minimum, maximum or None, what the operator must write)
    "PORT": (1, 65535, "a port number 1..65535"),
    "ROTATE_MINUTES": (0, None, "an integer >= 0 (minutes)"),
    "ROTATE_DELAY_SECONDS": (0, None, "an integer >= 0 (seconds; 0 = use ROTATE_MINUTES)"),
    "FW_MAX_QUEUE_SIZE": (0, None, "an integer >= 0 (flows; 0 = off)"),
    "DPI_ID": (-1, 4294967295, "an integer -1..4294967295 (-1 = the receiver's position in its stream)"),
    "QUEUE_BYTES": (65536, None, "an integer >= 65536 (bytes)"),
    "TEMPLATE_REFRESH": (1, None, "an integer >= 1 (seconds)"),
    "BALANCER_TASKSET": (0, None, "a CPU number >= 0"),
    "SPOOL_BYTES": (0, None, "an integer >= 0 (bytes of completed dump files kept; 0 = no limit)"),
    "HANG_SECONDS": (2, None, "an integer >= 2 (seconds without a status heartbeat before a handler is replaced)"),
    "TEMPLATES_MAX": (1, 65280, "an integer 1..65280 (templates per exporter session and ODID)"),
    "ODIDS_MAX": (1, None, "an integer >= 1 (ODIDs with templates per exporter session)"),
    "TEMPLATE_BYTES_MAX": (65536, None, "an integer >= 65536 (bytes of templates per exporter session)"),
    "STALL_SECONDS": (1, None, "an integer >= 1 (seconds a TCP subreceiver may take nothing before it is stalled)"),
    "DRAIN_SECONDS": (0, None, "an integer >= 0 (seconds a leaving exporter's queued messages may wait for "
                      "their subreceivers)"),
    "IDLE_TIMEOUT": (0, None, "an integer >= 0 (seconds; 0 = never)"),
    "MAX_SESSIONS": (1, None, "an integer >= 1 (exporter sessions)"),
    "MAX_SESSIONS_PER_SOURCE": (1, None, "an integer >= 1 (exporter sessions from one address)"),
    "MEMORY_BYTES": (1024 * 1024, None, "an integer >= 1048576 (bytes)"),
    "RCVBUF_BYTES": (65536, None, "an integer >= 65536 (bytes of the UDP listening socket's receive buffer)"),
}


_MODES = {m.value: m for m in Mode}
_PROTOS = {"tcp": "tcp", "udp": "udp"}
_SWITCH = {"Enabled": True, "Disabled": False}
_SOURCES = {"balancer": "balancer", "exporter": "exporter"}  # BALANCER_SUB_SOURCE: whose address datagrams carry


class ConfigError(Exception):
    """Every problem found in one pass, so the operator fixes the file once, not once per run."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.problems)  # args must rebuild the error when it crosses a process boundary

    def __str__(self) -> str:
        return "\n".join(self.problems)


def resolve_path(cli_value: str | None) -> str:
    """--config wins over $IPFIX_BALANCER_CONFIG, which wins over the appliance default."""
    return cli_value or os.environ.get("IPFIX_BALANCER_CONFIG") or DEFAULT_CONFIG_PATH


def load(path: str, cpus: Collection[int] | None = None, host: Host = LOCAL) -> Config:
    """Read and validate the .env at path; raise ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError([f"{path}: cannot read the configuration file ({reason}); expected a readable "
                           ".env file (choose it with --config or $IPFIX_BALANCER_CONFIG)"]) from None
    return load_text(text, path, cpus, host)


def load_text(text: str, path: str, cpus: Collection[int] | None = None, host: Host = LOCAL) -> Config:
    """Validate .env text as if read from path (the console checks an edit before writing it)."""
    try:
        # dotenv's own parser, not dotenv_values: that one also logs its parse warnings, and the operator
        # should read one message per problem, ours (what dotenv_values would return, with interpolate=False)
        bindings = list(parse_stream(io.StringIO(text)))
        problems = _file_problems(path, bindings)
        try:
            config = load_values({b.key: b.value for b in bindings if b.key is not None}, path, cpus, host)
        except ConfigError as e:
            raise ConfigError(problems + e.problems) from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a file must never crash the supervisor (start, reload, restart)
        raise ConfigError([f"{path}: cannot check the configuration ({type(e).__name__}: {_q(str(e))}); "
                           "expected a valid .env file"]) from None
    if problems:
        raise ConfigError(problems)
    return config


def key_lines(path: str) -> dict[str, int]:
    """The line each key is first written on in the file at path (empty when it cannot be read): for
    check-config, whose key-level problems name the key as written."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError):
        return {}
    lines: dict[str, int] = {}
    for b in parse_stream(io.StringIO(text)):
        if b.key and not b.error:
            lines.setdefault(b.key, b.original.line)
    return lines


def _file_problems(path: str, bindings: list) -> list[str]:
    """What dotenv drops silently: unparseable lines, lines without '=', and an IPFIX_ key repeated (the
    last wins)."""
    problems, first = [], {}
    for b in bindings:
        line = b.original.line
        if b.error or (b.key is not None and b.value is None):
            problems.append(f"{path}:{line}: {_q(b.original.string.strip())}: cannot parse this line; "
                            "expected KEY=value")
        elif b.key and b.key.upper().startswith("IPFIX_"):
            if b.key in first and first[b.key][1] != b.value:
                problems.append(f"{path}:{line}: {_q(b.key, quote=False)}={_q(b.value)}: already set to "
                                f"{_q(first[b.key][1])} on line {first[b.key][0]}; expected each key once")
            first.setdefault(b.key, (line, b.value))
    return problems


def load_values(values: Mapping[str, str | None], path: str = "<memory>", cpus: Collection[int] | None = None,
                host: Host = LOCAL) -> Config:
    """Validate already-read key/values; cpus are the CPUs that exist (default: the host's)."""
    cpus = host.cpus() if cpus is None else frozenset(cpus)
    problems: list[str] = []
    grouped = sorted(_group(values, problems).items(), key=lambda kv: (STREAMS.index(kv[0][0]), kv[0][1]))
    built, position = [], dict.fromkeys(STREAMS, 0)
    for (stream, index), keys in grouped:
        built.append(_build(Keys(stream, index, keys, problems, host), position[stream], cpus))
        position[stream] += 1
    checks.check_shared(built, problems)
    settings = _global_settings(values, problems, host)
    checks.check_cycles(built, host)
    console = _console(values, path, problems, host)
    if problems:
        raise ConfigError(problems)
    warnings = checks.warnings(built)
    if not built:
        warnings.append(f"{path}: no IPFIX_<STREAM>_<PARAM>[i] keys; no receiver is configured")
    return Config(path, tuple(rc for rc, _ in built), tuple(warnings), console=console, **settings)


def _global_settings(values: Mapping[str, str | None], problems: list[str], host: Host) -> dict:
    """IPFIX_BALANCER_<PARAM> keys: the same checks and messages as a receiver's keys."""
    g = Keys("BALANCER", 0, {p: (k, (values[k] or "").strip()) for k, p in _GLOBALS.items() if k in values},
             problems, host)
    metrics = g.endpoints("METRICS", "tcp")
    if len(metrics) > 1:
        g.fail("METRICS", "one host/port, e.g. 127.0.0.1/9464 (empty: no metrics)")
    token_file = (values.get("IPFIX_BALANCER_METRICS_TOKEN_FILE") or "").strip()
    if token_file and not host.readable(token_file):
        problems.append(f"IPFIX_BALANCER_METRICS_TOKEN_FILE={token_file!r}: not a file this user can read")
    return {"metrics": metrics[0] if metrics else None, "hang_seconds": g.integer("HANG_SECONDS", 15),
            "metrics_token_file": token_file}


def _console(values: Mapping[str, str | None], path: str, problems: list[str], host: Host) -> Console | None:
    """IPFIX_BALANCER_CONSOLE=host/port (empty: off). Off loopback only with TLS: the token and the whole
    configuration would otherwise cross the network in clear."""
    address, cert, key, token = ((values.get(k) or "").strip() for k in _CONSOLE_KEYS)
    if not address:
        return None
    m = _ITEM_RE.fullmatch(address)
    ip = None if m is None or m["proto"] is not None else ip_or_none(m["host"] if m["v6"] is None else m["v6"])
    port = None if m is None else _int(m["port"])
    if ip is None or port is None or not 1 <= port <= 65535:
        problems.append(f"IPFIX_BALANCER_CONSOLE={address!r}: expected host/port with an IP address, e.g. "
                        "127.0.0.1/8480 or [::1]/8480 (empty: no console)")
        return None
    for name, value in zip(_CONSOLE_KEYS[1:3], (cert, key)):
        if value and not host.readable(value):
            problems.append(f"{name}={value!r}: expected a readable PEM file")
    if not ip.is_loopback and not (cert and key):
        problems.append(f"IPFIX_BALANCER_CONSOLE={address!r}: {ip} is not a loopback address; expected "
                        "IPFIX_BALANCER_CONSOLE_TLS_CERT and IPFIX_BALANCER_CONSOLE_TLS_KEY to be set too "
                        "(or a loopback address, reached through an SSH tunnel)")
    token = token or os.path.join(os.path.dirname(os.path.abspath(path)), CONSOLE_TOKEN_NAME)
    return Console(host=str(ip), port=port, tls_cert=cert, tls_key=key, token_file=token)


def _group(values: Mapping[str, str | None], problems: list[str]) -> dict:
    """Sort IPFIX_ keys by receiver: {(stream, index): {param: (key as written, value)}}."""
    receivers: dict[tuple[str, int], dict[str, tuple[str, str]]] = {}
    for key, value in values.items():
        if key in _ENV_ONLY or key in _GLOBALS or key in _CONSOLE_KEYS or not key.upper().startswith("IPFIX_"):
            continue
        value = (value or "").strip()  # a key without '=' reads as None: treat as empty
        m = _KEY_RE.fullmatch(key)
        if m is None:
            problems.append(_unknown_key(key, value))
            continue
        param = _ALIASES.get(m["param"], m["param"])
        keys = receivers.setdefault((m["stream"], int(m["index"] or 0)), {})
        if param not in keys:
            keys[param] = (key, value)
        elif keys[param][1] != value:
            problems.append(f"{key}={_q(value)}: conflicts with {keys[param][0]}={_q(keys[param][1])}, which sets "
                            "the same parameter; expected only one of them")
    return receivers


def receiver_params() -> tuple[str, ...]:
    """Every per-receiver PARAM, aliases left out."""
    return tuple(p for p in _PARAMS if p not in _ALIASES)


def receiver_key(key: str) -> tuple[str, int, str] | None:
    """(stream, index, param) named by a receiver key as written (aliases resolved), or None."""
    m = _KEY_RE.fullmatch(key)
    return None if m is None else (m["stream"], int(m["index"] or 0), _ALIASES.get(m["param"], m["param"]))


def _unknown_key(key: str, value: str) -> str:
    base, bracket, rest = key.partition("[")
    if base in _ALL_KEYS:
        hint = "the index must be a number of at most 9 digits, e.g. [0]"
    else:
        close = difflib.get_close_matches(base.upper(), _ALL_KEYS + list(_GLOBALS), n=1)
        hint = f"did you mean {close[0]}{bracket}{rest}?" if close else f"PARAM is one of {', '.join(_PARAMS)}"
    return (f"{_q(key, quote=False)}={_q(value)}: unknown key; expected IPFIX_<{'|'.join(STREAMS)}>_<PARAM>[<i>] "
            f"({hint})")


class Keys:
    """One receiver's raw keys; every problem is reported under the key exactly as the file wrote it."""

    def __init__(self, stream: str, index: int, keys: dict[str, tuple[str, str]], problems: list[str], host: Host):
        self.stream, self.index, self.keys, self.problems = stream, index, keys, problems
        self.host = host  # what values are checked against: CAP_NET_RAW, broadcast addresses, directories

    def key(self, param: str) -> str:
        return self.keys[param][0] if param in self.keys else f"IPFIX_{self.stream}_{param}[{self.index}]"

    def value(self, param: str) -> str:
        return self.keys.get(param, ("", ""))[1]

    def describe(self, param: str, value) -> str:
        """KEY='value' when written, KEY (default value) when not, for messages about derived values."""
        key = self.key(param)
        return f"{key}={_q(self.value(param))}" if self.value(param) else f"{key} (default {value})"

    def fail(self, param: str, expected: str, item: str | None = None, why: str | None = None) -> None:
        """Report a problem. Returns None, so ``return self.fail(...)`` also leaves the field None."""
        where = f": item {_q(item)}" if item is not None else ""
        what = f": {why}; expected {expected}" if why else f": expected {expected}"
        self.problems.append(f"{self.key(param)}={_q(self.value(param))}{where}{what}")

    def integer(self, param: str, default: int | None) -> int | None:
        """An empty or missing value means the default; an invalid one is reported and gives None."""
        text = self.value(param)
        if not text:
            return default
        low, high, expected = _INTS[param]
        number = _int(text)
        if number is None or number < low or (high is not None and number > high):
            digits = len(text.lstrip("+-"))
            return self.fail(param, expected, why=f"{digits} digits" if digits > 18 and text.isascii()
                             and text.lstrip("+-").isdigit() else None)
        return number

    def word(self, param: str, choices: dict, default):
        text = self.value(param)
        if not text:
            return default
        lowered = {k.lower(): v for k, v in choices.items()}
        if text.lower() not in lowered:
            return self.fail(param, f"one of {', '.join(choices)} (any case)")
        return lowered[text.lower()]

    def address(self, param: str, default: str) -> str | None:
        text = self.value(param) or default
        ip = ip_or_none(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
        if ip is None:
            return self.fail(param, "an IP address such as 0.0.0.0 or ::", why=_not_an_ip(text))
        return str(ip)

    def endpoints(self, param: str, proto: str | None) -> tuple[Endpoint, ...]:
        """Comma-separated host/port items with the given proto, or host/port/proto items when proto is None."""
        found: list[Endpoint] = []
        for item in filter(None, (i.strip() for i in self.value(param).split(","))):
            endpoint = self._endpoint(param, item, proto)
            if endpoint in found:
                self.fail(param, "each address once", item, "listed twice")
            elif endpoint is not None:
                found.append(endpoint)
        return tuple(found)

    def networks(self, param: str) -> tuple[str, ...]:
        """Comma-separated addresses and CIDR prefixes (IPv4, IPv6), normalised ("10.0.0.1" -> "10.0.0.1/32")."""
        found: list[str] = []
        for item in filter(None, (i.strip() for i in self.value(param).split(","))):
            try:
                net = str(ipaddress.ip_network(item.replace("[", "").replace("]", ""), strict=False))
            except ValueError:
                self.fail(param, "addresses and prefixes such as 10.0.0.2, 10.1.0.0/16, 2001:db8::/32", item)
                continue
            if net not in found:
                found.append(net)
        return tuple(found)

    def _endpoint(self, param: str, item: str, proto: str | None) -> Endpoint | None:
        form = ("host/port/proto, e.g. 10.0.0.2/9920/tcp or [::1]/9920/udp (empty proto = tcp)" if proto is None
                else "host/port, e.g. 10.0.0.2/9920 or [::1]/9920")
        m = _ITEM_RE.fullmatch(item)
        if m is not None and param == "BALANCER_SUB" and m["proto"] is not None:
            return self.fail(param, form, item, f"the protocol goes in {self.key(param + '_PROTO')} (host/port/proto "
                                                "is the syntax of DUMP_INSERT_PROCESSES)")
        if m is None or (proto is not None and m["proto"] is not None):
            return self.fail(param, form, item)
        host = m["host"] if m["v6"] is None else m["v6"]
        ip = ip_or_none(host)
        if ip is None:
            return self.fail(param, form, item, _not_an_ip(host))
        if _is_broadcast(ip, self.host):
            return self.fail(param, form, item, f"{ip} is a broadcast address: every host of the network would "
                                                "get the stream")
        if (ip.version == 6) != (m["v6"] is not None):
            return self.fail(param, form, item, "IPv6 hosts go in brackets, IPv4 hosts do not")
        port = _int(m["port"])
        if port is None or not 1 <= port <= 65535:
            return self.fail(param, form, item, f"port {_q(m['port'])} is not a port number 1..65535")
        if proto is None:
            proto = (m["proto"] or "tcp").lower()
            if proto not in _PROTOS:
                return self.fail(param, form, item, f"proto {_q(m['proto'])} is not tcp or udp")
        return Endpoint(str(ip), port, proto)


def _build(r: Keys, position: int, cpus: frozenset[int]) -> tuple[ReceiverConfig, Keys]:
    """Parse one receiver; invalid fields are reported and left None (parse raises before anyone sees them)."""
    stream, index = r.stream, r.index
    port = r.integer("PORT", _DEFAULT_PORT[stream] if index == 0 else None)
    if port is None and not r.value("PORT"):
        r.problems.append(f"{r.key('PORT')} is required for receiver {stream.lower()}[{index}]: expected a "
                          "port number 1..65535 (only index 0 has a default port)")
    port_type = r.word("PORT_TYPE", _PROTOS, "tcp")
    bind = r.address("BIND", "0.0.0.0")
    mode = r.word("BALANCER", _MODES, Mode.DISABLED)
    sub_proto = r.word("BALANCER_SUB_PROTO", _PROTOS, "tcp")
    subs = r.endpoints("BALANCER_SUB", sub_proto or "tcp")
    if mode in (Mode.ROUND_ROBIN, Mode.ALL) and not r.value("BALANCER_SUB").replace(",", "").strip():
        r.fail("BALANCER_SUB", "at least one subreceiver host/port, e.g. 10.0.0.2/9920",
               why=f"{r.key('BALANCER')} is {mode.value}")
    exports = r.endpoints("DUMP_INSERT_PROCESSES", None)
    if None not in (port, port_type, bind):
        for param, endpoints in (("BALANCER_SUB", subs), ("DUMP_INSERT_PROCESSES", exports)):
            for e in endpoints:
                if checks.loops(e, port_type, port, bind, r.host):
                    r.fail(param, "an address other than the receiver's own", str(e),
                           f"this receiver listens there ({port_type} {bind} port {port}), it would loop")
    taskset = r.integer("BALANCER_TASKSET", None)
    if taskset is not None and taskset not in cpus:
        r.fail("BALANCER_TASKSET", f"a CPU this host has ({_cpu_list(cpus)})")
    dpi_id = r.integer("DPI_ID", -1)
    dump_dir = r.value("DUMP_DIR") or f"{DUMP_ROOT}/{stream.lower()}/" + (f"{index}/" if index else "")
    if not dump_dir.startswith("/"):
        r.fail("DUMP_DIR", "an absolute directory path")
    elif (why := _unusable_dir(dump_dir, r.host)) is not None:
        r.fail("DUMP_DIR", "a directory path the recorder can create", why=why)
    # Read in this order, so that problems are listed in the order operators know.
    rotate_minutes = r.integer("ROTATE_MINUTES", _DEFAULT_ROTATE_MINUTES[stream])
    rotate_delay_seconds = r.integer("ROTATE_DELAY_SECONDS", 0)
    max_flows_per_file = r.integer("FW_MAX_QUEUE_SIZE", 0)
    queue_bytes = r.integer("QUEUE_BYTES", 64 * 1024 * 1024)
    template_refresh = r.integer("TEMPLATE_REFRESH", 60)
    balancer_auto = r.word("BALANCER_AUTO", _SWITCH, False)
    spool_bytes = r.integer("SPOOL_BYTES", 0)
    limits_t = TemplateLimits(r.integer("TEMPLATES_MAX", TemplateLimits.templates_max),
                              r.integer("ODIDS_MAX", TemplateLimits.odids_max),
                              r.integer("TEMPLATE_BYTES_MAX", TemplateLimits.template_bytes_max))
    stall_seconds = r.integer("STALL_SECONDS", 5)
    drain_seconds = r.integer("DRAIN_SECONDS", 600)
    sub_source = r.word("BALANCER_SUB_SOURCE", _SOURCES, "balancer")
    if sub_source == "exporter":
        _check_source_preservation(r, sub_proto, bind, subs)
    limits = Limits(allow=r.networks("ALLOW"), idle_timeout=r.integer("IDLE_TIMEOUT", Limits.idle_timeout),
                    max_sessions=r.integer("MAX_SESSIONS", Limits.max_sessions),
                    max_sessions_per_source=r.integer("MAX_SESSIONS_PER_SOURCE", Limits.max_sessions_per_source),
                    memory_bytes=r.integer("MEMORY_BYTES", default_memory_bytes(r.host)),
                    rcvbuf_bytes=r.integer("RCVBUF_BYTES", Limits.rcvbuf_bytes))
    receiver = ReceiverConfig(
        stream=stream, index=index, taskset=taskset, listen=Listen(port_type=port_type, bind=bind, port=port),
        forwarding=ForwardingSettings(mode=mode, subreceivers=subs, sub_proto=sub_proto, queue_bytes=queue_bytes,
                                      template_refresh=template_refresh, balancer_auto=balancer_auto,
                                      stall_seconds=stall_seconds, drain_seconds=drain_seconds,
                                      sub_source=sub_source),
        recording=Recording(rotate_minutes=rotate_minutes, rotate_delay_seconds=rotate_delay_seconds,
                            max_flows_per_file=max_flows_per_file, dump_insert_processes=exports,
                            dpi_id=position if dpi_id == -1 else dpi_id, dump_dir=dump_dir, spool_bytes=spool_bytes),
        template_limits=limits_t, limits=limits)
    return receiver, r


def _check_source_preservation(r: Keys, sub_proto: str | None, bind: str | None, subs) -> None:
    """Sending with the exporter's address takes raw IPv4 sockets: UDP subreceivers, IPv4 on both sides,
    and CAP_NET_RAW (checked here, so the operator learns it before anything listens)."""
    expected = "balancer, or exporter with UDP IPv4 subreceivers, an IPv4 BIND and CAP_NET_RAW"
    if sub_proto != "udp":
        r.fail("BALANCER_SUB_SOURCE", expected, why=f"{r.describe('BALANCER_SUB_PROTO', 'tcp')}: a TCP "
               "connection cannot carry another host's address")
    if (bind is not None and ":" in bind) or any(":" in e.host for e in subs):
        r.fail("BALANCER_SUB_SOURCE", expected, why="IPv6 is not supported for source preservation")
    if not r.host.has_cap_net_raw():
        r.fail("BALANCER_SUB_SOURCE", expected, why="this process lacks CAP_NET_RAW (run as root, or grant it: "
               "AmbientCapabilities=CAP_NET_RAW in the service unit)")


def _is_broadcast(ip: IPAddress, host: Host) -> bool:
    """255.255.255.255, or the broadcast address of one of this host's IPv4 networks. A broadcast address is
    odd (all host bits set), so the kernel is asked only about odd non-loopback addresses."""
    if ip.version != 4:
        return False
    return int(ip) == 0xFFFFFFFF or (int(ip) & 1 == 1 and not ip.is_loopback and ip in host.local_broadcasts())


def _unusable_dir(path: str, host: Host) -> str | None:
    """Why ``path`` cannot become a directory (a component longer than the file system allows, or an existing
    file in its place), or None. Checked here so the recorder does not find out at its first file."""
    if "\0" in path:
        return "it contains a NUL character"
    existing, is_dir = host.nearest_existing(path)
    if not is_dir:
        return f"{_q(existing)} exists and is not a directory"
    name_max, path_max = host.name_limits(existing)
    long = [part for part in path.split("/") if len(part.encode()) > name_max]
    if long:
        return f"component {_q(long[0])} is {len(long[0].encode())} bytes, the file system allows {name_max}"
    if len(path.encode()) + name_max >= path_max:  # room for a dump file's name (and an auto-<port>/ below)
        return f"it is {len(path.encode())} bytes long, so its files' paths could exceed {path_max} bytes"
    return None


def _not_an_ip(host: str) -> str:
    """Why host is refused: a mistyped address (10.0.0.300) is not a hostname, and hearing that hostnames
    are not resolved would only mislead."""
    if re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*", host):
        return f"{_q(host)} is not a valid IP address"
    return f"{_q(host)} is not an IP address ({_NO_DNS})"


def _int(text: str) -> int | None:
    """Plain decimal only: int() would also take '1_000' or non-ASCII digits. Beyond 18 digits (int64) no
    setting makes sense, and beyond 4,300 int() itself raises."""
    return int(text) if re.fullmatch(r"[+-]?[0-9]{1,18}", text) else None


QUOTE_MAX = 100  # characters of a value quoted in a message


def _q(text: str | None, quote: bool = True) -> str:
    """``text`` (quoted) for a message, cut to QUOTE_MAX characters: a 5,000-digit value must not flood it."""
    show = repr if quote else str
    if text is None or len(text) <= QUOTE_MAX:
        return show(text)
    return f"{show(text[:QUOTE_MAX])}... ({len(text)} characters)"


def _cpu_list(cpus: Collection[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5', the notation of taskset and /proc/cpuinfo users."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs) or "none"
