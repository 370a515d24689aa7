"""The operator's .env turned into validated, frozen receiver settings.

Every other module receives these objects, never raw strings, so all checking happens here: an operator
who mistypes a key or a value gets one message per problem, all at once, before anything listens.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import io
import ipaddress
import json
import os
import re
import socket
from collections.abc import Collection, Mapping

from dotenv.parser import parse_stream

STREAMS = ("FULLFLOW", "CLICKSTREAM", "DNSFLOW")
DEFAULT_CONFIG_PATH = "/var/fast_ipfix_balancer/backend/.env"
DUMP_ROOT = "/var/fast_ipfix_balancer/dump"
AUTO_INDEX_BASE = 100  # balancer-auto recorders: index 100, 101, … of their stream

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


class Mode(enum.Enum):
    """BALANCER: how received messages are passed on; Disabled records them to files instead."""
    ROUND_ROBIN = "RoundRobin"
    ALL = "All"
    DISABLED = "Disabled"


_MODES = {m.value: m for m in Mode}
_PROTOS = {"tcp": "tcp", "udp": "udp"}
_SWITCH = {"Enabled": True, "Disabled": False}
_SOURCES = {"balancer": "balancer", "exporter": "exporter"}  # BALANCER_SUB_SOURCE: whose address datagrams carry


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A collector address; host is a normalised IP literal, never a name (no DNS at start)."""
    host: str
    port: int
    proto: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}/{self.port}/{self.proto}"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclasses.dataclass(frozen=True)
class Listen:
    """Where the receiver listens: PORT_TYPE, BIND, PORT. Changing any of it needs a new handler process."""
    port_type: str
    bind: str
    port: int


@dataclasses.dataclass(frozen=True)
class Forwarding:
    """How received messages are passed on (BALANCER and the BALANCER_* keys); changes apply in place."""
    mode: Mode
    subreceivers: tuple[Endpoint, ...]
    sub_proto: str
    queue_bytes: int
    template_refresh: int
    balancer_auto: bool
    stall_seconds: int = 5  # a TCP subreceiver that acknowledges nothing this long is stalled
    drain_seconds: int = 600  # after its exporter left, how long a session's queues may wait for subreceivers
    sub_source: str = "balancer"  # "exporter": UDP datagrams carry the exporter's address and port (raw socket)


@dataclasses.dataclass(frozen=True)
class Recording:
    """What a recorder (mode Disabled) is built from: a change here completes the current dump file."""
    rotate_minutes: int
    rotate_delay_seconds: int
    max_flows_per_file: int  # FW_MAX_QUEUE_SIZE: despite the key's name, data records (flows) per dump file
    dump_insert_processes: tuple[Endpoint, ...]
    dpi_id: int
    dump_dir: str
    spool_bytes: int = 0  # completed dumps kept on disk, oldest deleted beyond; 0 = no limit

    @property
    def rotate_seconds(self) -> int:
        """The manual: when ROTATE_DELAY_SECONDS is set, ROTATE_MINUTES is ignored."""
        return self.rotate_delay_seconds if self.rotate_delay_seconds > 0 else self.rotate_minutes * 60


def _default_memory_bytes() -> int:
    """MEMORY_BYTES when not set: 1 GiB, or a quarter of this host's memory when that is less."""
    try:
        return min(1024 ** 3, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
    except (ValueError, OSError):
        return 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Limits:
    """What any host that reaches the port may cost the handler (README "Hostile input"); changes apply in place."""
    allow: tuple[str, ...] = ()  # networks exporters may come from; empty = anyone
    idle_timeout: int = 600  # seconds without a byte before a TCP exporter session is closed; 0 = never
    max_sessions: int = 1000
    max_sessions_per_source: int = 100  # TCP sessions from one address
    memory_bytes: int = dataclasses.field(default_factory=_default_memory_bytes)  # all send queues together
    rcvbuf_bytes: int = 32 * 1024 * 1024  # UDP: the kernel's buffer for a burst (0.1 s at 200,000 x 1,400 B)

    def allows(self, host: str) -> bool:
        if not self.allow:
            return True
        ip = ipaddress.ip_address(host.partition("%")[0])  # a link-local peer carries its scope
        ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self._networks)

    @functools.cached_property
    def _networks(self) -> list:
        """The ALLOW networks; an IPv4-mapped range (``::ffff:10.0.0.0/104``) as the IPv4 one it maps, since
        a peer's address is compared as IPv4 (``allows``)."""
        nets = [ipaddress.ip_network(net) for net in self.allow]
        return [ipaddress.ip_network(f"{n.network_address.ipv4_mapped}/{n.prefixlen - 96}")
                if n.version == 6 and n.prefixlen >= 96 and n.network_address.ipv4_mapped is not None else n
                for n in nets]


@dataclasses.dataclass(frozen=True)
class TemplateLimits:
    """Template state one exporter session may hold (README "Hostile input"); applies in place on reload."""
    templates_max: int = 4096               # per (session, ODID)
    odids_max: int = 256                    # ODIDs with templates, per session
    template_bytes_max: int = 1024 * 1024   # record bytes + 64 per template, per session


@dataclasses.dataclass(frozen=True)
class ReceiverConfig:
    """Everything one handler process needs; see the configuration reference for each field's key."""
    stream: str
    index: int
    listen: Listen
    forwarding: Forwarding
    recording: Recording
    taskset: int | None
    template_limits: TemplateLimits = TemplateLimits()
    limits: Limits = Limits()

    @property
    def name(self) -> str:
        return f"{self.stream.lower()}[{self.index}]"

    @property
    def proc_name(self) -> str:
        """What `ps -o comm` shows, so operators can find the handler as the manual describes. The
        kernel keeps 15 characters, hence "click" for Clickstream (``ipfix-click``, ``ipfix-click1``)."""
        short = {"CLICKSTREAM": "click"}.get(self.stream, self.stream.lower())
        return f"ipfix-{short}{self.index or ''}"

    def to_json(self) -> str:
        """The supervisor passes this to the handler process, which rebuilds it with from_json."""
        data = dataclasses.asdict(self)
        data["forwarding"]["mode"] = self.forwarding.mode.value
        return json.dumps(data)

    @classmethod
    def from_json(cls, s: str) -> ReceiverConfig:
        data = json.loads(s)
        if "listen" not in data:
            data = _nest_flat(data)
        forwarding, recording = data["forwarding"], data["recording"]
        return cls(
            stream=data["stream"], index=data["index"], taskset=data["taskset"], listen=Listen(**data["listen"]),
            forwarding=Forwarding(**{**forwarding, "mode": Mode(forwarding["mode"]),
                                     "subreceivers": _endpoints(forwarding["subreceivers"])}),
            recording=Recording(**{**recording,
                                   "dump_insert_processes": _endpoints(recording["dump_insert_processes"])}),
            template_limits=TemplateLimits(**data.get("template_limits", {})),
            limits=Limits(**{**data.get("limits", {}), "allow": tuple(data.get("limits", {}).get("allow", ()))}))


def _endpoints(items: list[dict]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(**e) for e in items)


def _nest_flat(data: dict) -> dict:
    """The flat form of releases before the settings groups. A supervisor restarted in place for an upgrade
    reads the running receivers from the adopt file its predecessor wrote in that form."""
    flat = {**data, "max_flows_per_file": data["fw_max_queue_size"]}

    def group(cls) -> dict:
        return {f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat}  # newer keys: defaults

    return {"stream": flat["stream"], "index": flat["index"], "taskset": flat["taskset"], "listen": group(Listen),
            "forwarding": group(Forwarding), "recording": group(Recording)}


@dataclasses.dataclass(frozen=True)
class Console:
    """IPFIX_BALANCER_CONSOLE*: where the web console listens (TLS files required off loopback) and the
    file holding its login token."""
    host: str
    port: int
    tls_cert: str
    tls_key: str
    token_file: str

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, s: str) -> Console:
        return cls(**json.loads(s))


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    receivers: tuple[ReceiverConfig, ...]
    warnings: tuple[str, ...]
    metrics: Endpoint | None = None  # IPFIX_BALANCER_METRICS: where GET /metrics and /healthz are served
    hang_seconds: int = 15  # IPFIX_BALANCER_HANG_SECONDS
    metrics_token_file: str = ""  # IPFIX_BALANCER_METRICS_TOKEN_FILE: GET /metrics wants its bearer token
    console: Console | None = None  # None: IPFIX_BALANCER_CONSOLE empty, no console


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


def load(path: str, cpus: Collection[int] | None = None) -> Config:
    """Read and validate the .env at path; raise ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError([f"{path}: cannot read the configuration file ({reason}); expected a readable "
                           ".env file (choose it with --config or $IPFIX_BALANCER_CONFIG)"]) from None
    return load_text(text, path, cpus)


def load_text(text: str, path: str, cpus: Collection[int] | None = None) -> Config:
    """Validate .env text as if read from path (the console checks an edit before writing it)."""
    try:
        # dotenv's own parser, not dotenv_values: that one also logs its parse warnings, and the operator
        # should read one message per problem, ours (what dotenv_values would return, with interpolate=False)
        bindings = list(parse_stream(io.StringIO(text)))
        problems = _file_problems(path, bindings)
        try:
            config = parse({b.key: b.value for b in bindings if b.key is not None}, path, cpus)
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


def parse(values: Mapping[str, str | None], path: str = "<memory>",
          cpus: Collection[int] | None = None) -> Config:
    """Validate already-read key/values; cpus are the CPUs that exist (default: this host's)."""
    cpus = _host_cpus() if cpus is None else frozenset(cpus)
    problems: list[str] = []
    grouped = sorted(_group(values, problems).items(), key=lambda kv: (STREAMS.index(kv[0][0]), kv[0][1]))
    built, position = [], dict.fromkeys(STREAMS, 0)
    for (stream, index), keys in grouped:
        built.append(_build(_Keys(stream, index, keys, problems), position[stream], cpus))
        position[stream] += 1
    _check_shared(built, problems)
    settings = _global_settings(values, problems)
    _check_cycles(built, problems)
    console = _console(values, path, problems)
    if problems:
        raise ConfigError(problems)
    warnings = (list(_rotation_warnings(built)) + list(_datagram_warnings(built)) + list(_unused_warnings(built))
                + list(_privileged_port_warnings(built)))
    if not built:
        warnings.append(f"{path}: no IPFIX_<STREAM>_<PARAM>[i] keys; no receiver is configured")
    return Config(path, tuple(rc for rc, _ in built), tuple(warnings), console=console, **settings)


def _global_settings(values: Mapping[str, str | None], problems: list[str]) -> dict:
    """IPFIX_BALANCER_<PARAM> keys: the same checks and messages as a receiver's keys."""
    g = _Keys("BALANCER", 0, {p: (k, (values[k] or "").strip()) for k, p in _GLOBALS.items() if k in values},
              problems)
    metrics = g.endpoints("METRICS", "tcp")
    if len(metrics) > 1:
        g.fail("METRICS", "one host/port, e.g. 127.0.0.1/9464 (empty: no metrics)")
    token_file = (values.get("IPFIX_BALANCER_METRICS_TOKEN_FILE") or "").strip()
    if token_file and not os.access(token_file, os.R_OK):
        problems.append(f"IPFIX_BALANCER_METRICS_TOKEN_FILE={token_file!r}: not a file this user can read")
    return {"metrics": metrics[0] if metrics else None, "hang_seconds": g.integer("HANG_SECONDS", 15),
            "metrics_token_file": token_file}


def _console(values: Mapping[str, str | None], path: str, problems: list[str]) -> Console | None:
    """IPFIX_BALANCER_CONSOLE=host/port (empty: off). Off loopback only with TLS: the token and the whole
    configuration would otherwise cross the network in clear."""
    address, cert, key, token = ((values.get(k) or "").strip() for k in _CONSOLE_KEYS)
    if not address:
        return None
    m = _ITEM_RE.fullmatch(address)
    ip = None if m is None or m["proto"] is not None else _ip(m["host"] if m["v6"] is None else m["v6"])
    port = None if m is None else _int(m["port"])
    if ip is None or port is None or not 1 <= port <= 65535:
        problems.append(f"IPFIX_BALANCER_CONSOLE={address!r}: expected host/port with an IP address, e.g. "
                        "127.0.0.1/8480 or [::1]/8480 (empty: no console)")
        return None
    for name, value in zip(_CONSOLE_KEYS[1:3], (cert, key)):
        if value and not os.access(value, os.R_OK):
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
    return f"{_q(key, quote=False)}={_q(value)}: unknown key; expected IPFIX_<{'|'.join(STREAMS)}>_<PARAM>[<i>] ({hint})"


class _Keys:
    """One receiver's raw keys; every problem is reported under the key exactly as the file wrote it."""

    def __init__(self, stream: str, index: int, keys: dict[str, tuple[str, str]], problems: list[str]):
        self.stream, self.index, self.keys, self.problems = stream, index, keys, problems

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
        ip = _ip(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
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
        ip = _ip(host)
        if ip is None:
            return self.fail(param, form, item, _not_an_ip(host))
        if _is_broadcast(ip):
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


def _build(r: _Keys, position: int, cpus: frozenset[int]) -> tuple[ReceiverConfig, _Keys]:
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
                if _loops(e, port_type, port, bind):
                    r.fail(param, "an address other than the receiver's own", str(e),
                           f"this receiver listens there ({port_type} {bind} port {port}), it would loop")
    taskset = r.integer("BALANCER_TASKSET", None)
    if taskset is not None and taskset not in cpus:
        r.fail("BALANCER_TASKSET", f"a CPU this host has ({_cpu_list(cpus)})")
    dpi_id = r.integer("DPI_ID", -1)
    dump_dir = r.value("DUMP_DIR") or f"{DUMP_ROOT}/{stream.lower()}/" + (f"{index}/" if index else "")
    if not dump_dir.startswith("/"):
        r.fail("DUMP_DIR", "an absolute directory path")
    elif (why := _unusable_dir(dump_dir)) is not None:
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
                    memory_bytes=r.integer("MEMORY_BYTES", _default_memory_bytes()),
                    rcvbuf_bytes=r.integer("RCVBUF_BYTES", Limits.rcvbuf_bytes))
    receiver = ReceiverConfig(
        stream=stream, index=index, taskset=taskset, listen=Listen(port_type=port_type, bind=bind, port=port),
        forwarding=Forwarding(mode=mode, subreceivers=subs, sub_proto=sub_proto, queue_bytes=queue_bytes,
                              template_refresh=template_refresh, balancer_auto=balancer_auto,
                              stall_seconds=stall_seconds, drain_seconds=drain_seconds, sub_source=sub_source),
        recording=Recording(rotate_minutes=rotate_minutes, rotate_delay_seconds=rotate_delay_seconds,
                            max_flows_per_file=max_flows_per_file, dump_insert_processes=exports,
                            dpi_id=position if dpi_id == -1 else dpi_id, dump_dir=dump_dir, spool_bytes=spool_bytes),
        template_limits=limits_t, limits=limits)
    return receiver, r


def _check_source_preservation(r: _Keys, sub_proto: str | None, bind: str | None, subs) -> None:
    """Sending with the exporter's address takes raw IPv4 sockets: UDP subreceivers, IPv4 on both sides,
    and CAP_NET_RAW (checked here, so the operator learns it before anything listens)."""
    expected = "balancer, or exporter with UDP IPv4 subreceivers, an IPv4 BIND and CAP_NET_RAW"
    if sub_proto != "udp":
        r.fail("BALANCER_SUB_SOURCE", expected, why=f"{r.describe('BALANCER_SUB_PROTO', 'tcp')}: a TCP "
               "connection cannot carry another host's address")
    if (bind is not None and ":" in bind) or any(":" in e.host for e in subs):
        r.fail("BALANCER_SUB_SOURCE", expected, why="IPv6 is not supported for source preservation")
    if not has_cap_net_raw():
        r.fail("BALANCER_SUB_SOURCE", expected, why="this process lacks CAP_NET_RAW (run as root, or grant it: "
               "AmbientCapabilities=CAP_NET_RAW in the service unit)")


def has_cap_net_raw() -> bool:
    """CAP_NET_RAW (bit 13) in this process's effective capabilities."""
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caps.split()[1], 16) >> 13 & 1)


def _check_shared(built: list[tuple[ReceiverConfig, _Keys]], problems: list[str]) -> None:
    """Receivers must not share a listening socket, nor (when recording) a dump directory."""
    dirs: dict[str, str] = {}
    for i, (rc_a, ka) in enumerate(built):
        a = rc_a.listen
        for rc_b, kb in built[i + 1:]:
            b = rc_b.listen
            if (None not in (a.port, a.port_type, a.bind, b.bind) and (a.port_type, a.port) == (b.port_type, b.port)
                    and (a.bind == b.bind or _ip(a.bind).is_unspecified or _ip(b.bind).is_unspecified)):
                problems.append(f"{kb.describe('PORT', b.port)}: {b.port_type} port {b.port} is already used by "
                                f"{ka.describe('PORT', a.port)}; expected a listening port unique to each receiver")
        if rc_a.forwarding.mode is Mode.DISABLED:
            dump_dir = rc_a.recording.dump_dir
            where = os.path.normpath(dump_dir)
            if where in dirs:
                problems.append(f"{ka.describe('DUMP_DIR', dump_dir)}: directory already used by {dirs[where]}; "
                                "expected a dump directory of its own for each recording receiver")
            dirs.setdefault(where, ka.describe("DUMP_DIR", dump_dir))


def _check_cycles(built: list[tuple[ReceiverConfig, _Keys]], problems: list[str]) -> None:
    """Receivers must not forward to each other in a circle (fullflow[0] -> fullflow[1] -> fullflow[0]): each
    message would go round for ever. Reported once per circle, on its first receiver."""
    complete = [rc for rc, _ in built if None not in (rc.listen.port, rc.listen.port_type, rc.listen.bind)]
    keys = {id(rc): r for rc, r in built}
    reaches = {id(a): [b for b in complete if b is not a and a.forwarding.mode in (Mode.ROUND_ROBIN, Mode.ALL)
                       and any(_loops(e, b.listen.port_type, b.listen.port, b.listen.bind)
                               for e in a.forwarding.subreceivers)] for a in complete}
    order = {id(rc): i for i, rc in enumerate(complete)}
    for start in complete:
        path = _path_back(start, reaches)
        if path and min(order[id(rc)] for rc in path) == order[id(start)]:
            circle = " -> ".join(rc.name for rc in path + [start])
            keys[id(start)].fail("BALANCER_SUB", "subreceivers that do not lead back to this receiver",
                                 why=f"the receivers forward to each other in a circle ({circle})")


def _path_back(start: ReceiverConfig, reaches: dict) -> list[ReceiverConfig] | None:
    """The shortest forwarding path from ``start`` back to itself (breadth first), or None."""
    parents = {id(start): None}
    frontier = [start]
    while frontier:
        following = []
        for rc in frontier:
            for nxt in reaches[id(rc)]:
                if nxt is start:
                    path = [rc]
                    while parents[id(path[-1])] is not None:
                        path.append(parents[id(path[-1])])
                    return path[::-1]
                if id(nxt) not in parents:
                    parents[id(nxt)] = rc
                    following.append(nxt)
        frontier = following
    return None


def _rotation_warnings(built: list[tuple[ReceiverConfig, _Keys]]):
    """The manual: Clickstream must rotate no sooner than Fullflow, whose rotation HUPs the others."""
    fullflow = {rc.index: rc for rc, _ in built if rc.stream == "FULLFLOW" and rc.forwarding.mode is Mode.DISABLED}
    for rc, r in built:
        ff = fullflow.get(rc.index)
        rec = rc.recording
        if (rc.stream == "CLICKSTREAM" and rc.forwarding.mode is Mode.DISABLED and ff
                and rec.rotate_seconds < ff.recording.rotate_seconds):
            param = "ROTATE_DELAY_SECONDS" if rec.rotate_delay_seconds > 0 else "ROTATE_MINUTES"
            yield (f"{r.describe(param, getattr(rec, param.lower()))}: Clickstream rotates every "
                   f"{rec.rotate_seconds} s, sooner than {ff.name} ({ff.recording.rotate_seconds} s); expected "
                   "Clickstream's rotation period >= Fullflow's, as the manual requires")


def _datagram_warnings(built: list[tuple[ReceiverConfig, _Keys]]):
    """TCP carries IPFIX messages of up to 65,535 bytes; a UDP datagram at most 65,507 bytes of payload."""
    for rc, r in built:
        fw = rc.forwarding
        if rc.listen.port_type == "tcp" and fw.sub_proto == "udp" and fw.mode in (Mode.ROUND_ROBIN, Mode.ALL):
            yield (f"{r.describe('BALANCER_SUB_PROTO', 'tcp')}: {rc.name} receives TCP and forwards UDP; "
                   "exporters must keep messages under 65,507 bytes (larger ones cannot be sent as one datagram "
                   "and are dropped, counted as oversize)")


_RECORDING_PARAMS = ("ROTATE_MINUTES", "ROTATE_DELAY_SECONDS", "FW_MAX_QUEUE_SIZE", "DUMP_INSERT_PROCESSES",
                     "DUMP_DIR", "SPOOL_BYTES")


def _unused_warnings(built: list[tuple[ReceiverConfig, _Keys]]):
    """Rotation and export keys on a receiver that records nothing: the operator expects files or inserts."""
    for rc, r in built:
        fw = rc.forwarding
        unused = [f"{r.key(p)}={_q(r.value(p))}" for p in _RECORDING_PARAMS if r.value(p)]
        if unused and fw.mode is not Mode.DISABLED and not fw.balancer_auto:
            yield (f"{', '.join(unused)}: {rc.name} forwards ({r.describe('BALANCER', fw.mode.value)}) and records "
                   f"nothing, so {'this key has' if len(unused) == 1 else 'these keys have'} no effect; expected "
                   f"BALANCER=Disabled or BALANCER_AUTO=Enabled for recording")


def _privileged_port_warnings(built: list[tuple[ReceiverConfig, _Keys]]):
    """The shipped unit runs without capabilities: a port below 1024 would fail to listen under it."""
    for rc, r in built:
        if rc.listen.port < 1024:
            yield (f"{r.describe('PORT', rc.listen.port)}: a port below 1024 needs CAP_NET_BIND_SERVICE, which the "
                   "shipped unit does not grant; render a unit that does (python -m ipfix_balancer.render unit "
                   "--config PATH) or add AmbientCapabilities= and CapabilityBoundingSet=CAP_NET_BIND_SERVICE in a "
                   "drop-in (systemctl edit fast_ipfix_balancer)")


def live_change_impossible(old: ReceiverConfig, new: ReceiverConfig) -> bool:
    """True when the new settings need a new handler process (a new listening socket or CPU); forwarding
    and recording settings change in place."""
    return ((old.stream, old.index, old.listen, old.taskset, old.forwarding.sub_source)
            != (new.stream, new.index, new.listen, new.taskset, new.forwarding.sub_source))


def auto_receivers(config: Config) -> list[ReceiverConfig]:
    """Recording receivers implied by BALANCER_AUTO=Enabled on RoundRobin/All receivers.

    Each subreceiver on a local address (loopback, unspecified, or an address of this host) gets a recorder
    listening there (``bind`` = that address, proto = BALANCER_SUB_PROTO) that records into
    ``<parent dump dir>/auto-<port>/``. It inherits the parent's rotation, export, spool and DPI_ID settings;
    it is not pinned to a CPU. Its index is 100, 101, … in its stream (skipping configured indexes), so
    status shows it as e.g. ``fullflow[100]``. A subreceiver whose port another receiver already listens on
    (same proto, same or wildcard address) is that receiver's business and gets no auto recorder.
    """
    used = {(rc.stream, rc.index) for rc in config.receivers}
    listening = [rc.listen for rc in config.receivers]
    next_index = dict.fromkeys(STREAMS, AUTO_INDEX_BASE)
    out: list[ReceiverConfig] = []
    for parent in config.receivers:
        if not parent.forwarding.balancer_auto or parent.forwarding.mode is Mode.DISABLED:
            continue
        for sub in parent.forwarding.subreceivers:
            if not _is_local(sub.host):
                continue
            if any(lst.port_type == sub.proto and lst.port == sub.port and
                   (lst.bind == sub.host or _ip(lst.bind).is_unspecified or _ip(sub.host).is_unspecified)
                   for lst in listening):
                continue
            index = next_index[parent.stream]
            while (parent.stream, index) in used:
                index += 1
            next_index[parent.stream] = index + 1
            used.add((parent.stream, index))
            listen = Listen(port_type=sub.proto, bind=sub.host, port=sub.port)
            listening.append(listen)
            out.append(dataclasses.replace(
                parent, index=index, listen=listen, taskset=None,
                forwarding=dataclasses.replace(parent.forwarding, mode=Mode.DISABLED, subreceivers=(),
                                               balancer_auto=False),
                recording=dataclasses.replace(parent.recording, dump_dir=os.path.join(
                    parent.recording.dump_dir, f"auto-{sub.port}", ""))))
    return out


def _is_local(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or ip.is_unspecified or ip in local_addresses()


def _loops(e: Endpoint, proto: str, port: int, bind: str) -> bool:
    """True when sending to e would reach this receiver's own listening socket."""
    if (e.proto, e.port) != (proto, port):
        return False
    dst, listen = _unmapped(e.host), _unmapped(bind)
    if not listen.is_unspecified:
        return dst == listen
    # 0.0.0.0 accepts IPv4 only; :: is dual-stack on Linux.
    return (listen.version == 6 or dst.version == 4) and (
        dst.is_loopback or dst.is_unspecified or dst in local_addresses())


def _unmapped(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address a socket really talks to: ::ffff:a.b.c.d is IPv4 a.b.c.d (dual-stack sockets)."""
    ip = ipaddress.ip_address(host)
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _is_broadcast(ip) -> bool:
    """255.255.255.255, or the broadcast address of one of this host's IPv4 networks. A broadcast address is
    odd (all host bits set), so the kernel is asked only about odd non-loopback addresses."""
    if ip.version != 4:
        return False
    return int(ip) == 0xFFFFFFFF or (int(ip) & 1 == 1 and not ip.is_loopback and ip in local_broadcasts())


def local_broadcasts() -> set:
    """The broadcast addresses of this host's IPv4 networks (empty when netlink cannot tell)."""
    try:
        from pyroute2 import IPRoute
        with IPRoute() as ipr:
            return {ip for msg in ipr.get_addr(family=socket.AF_INET)
                    if (ip := _ip(msg.get_attr("IFA_BROADCAST") or "")) is not None}
    except Exception:  # noqa: BLE001 - a check that cannot run must not stop the balancer
        return set()


def _unusable_dir(path: str) -> str | None:
    """Why ``path`` cannot become a directory (a component longer than the file system allows, or an existing
    file in its place), or None. Checked here so the recorder does not find out at its first file."""
    if "\0" in path:
        return "it contains a NUL character"
    existing = os.path.normpath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{_q(existing)} exists and is not a directory"
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    long = [part for part in path.split("/") if len(part.encode()) > name_max]
    if long:
        return f"component {_q(long[0])} is {len(long[0].encode())} bytes, the file system allows {name_max}"
    if len(path.encode()) + name_max >= path_max:  # room for a dump file's name (and an auto-<port>/ below)
        return f"it is {len(path.encode())} bytes long, so its files' paths could exceed {path_max} bytes"
    return None


def local_addresses() -> set:
    """This host's interface addresses (read only when a subreceiver's port matches, which is rare)."""
    from pyroute2 import IPRoute   # netlink: the kernel's own list, for this network namespace
    with IPRoute() as ipr:
        return {ip for msg in ipr.get_addr()
                if (ip := _ip(msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") or "")) is not None}


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
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


def _host_cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0)) | frozenset(range(os.cpu_count() or 1))


def _cpu_list(cpus: Collection[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5', the notation of taskset and /proc/cpuinfo users."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs) or "none"
