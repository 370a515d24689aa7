"""The settings model: frozen receiver settings, grouped by what a change of them needs.

The only config module ``core/`` imports, so it asks nothing of the host (no file, socket or netlink): the
values that depend on the host are found by ``parse`` and ``derive`` and arrive here already decided.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
import json
from typing import Any

STREAMS = ("FULLFLOW", "CLICKSTREAM", "DNSFLOW")
MEMORY_BYTES_MAX = 1024 ** 3  # MEMORY_BYTES when not set, unless a quarter of the host's memory is less (derive)


class Mode(enum.Enum):
    """BALANCER: how received messages are passed on; Disabled records them to files instead."""
    ROUND_ROBIN = "RoundRobin"
    ALL = "All"
    DISABLED = "Disabled"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A collector address; host is a normalised IP literal, never a name (no DNS at start)."""
    host: str
    port: int
    proto: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.ip_version == 6 else self.host
        return f"{host}/{self.port}/{self.proto}"

    @property
    def ip_version(self) -> int:
        """4 or 6: the edges choose the socket family from it (this module imports no socket)."""
        return 6 if ":" in self.host else 4


@dataclasses.dataclass(frozen=True)
class Listen:
    """Where the receiver listens: PORT_TYPE, BIND, PORT. Changing any of it needs a new handler process."""
    port_type: str
    bind: str
    port: int


@dataclasses.dataclass(frozen=True)
class ForwardingSettings:
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


@dataclasses.dataclass(frozen=True)
class Limits:
    """What any host that reaches the port may cost the handler (README "Hostile input"); changes apply in place."""
    allow: tuple[str, ...] = ()  # networks exporters may come from; empty = anyone
    idle_timeout: int = 600  # seconds without a byte before a TCP exporter session is closed; 0 = never
    max_sessions: int = 1000
    max_sessions_per_source: int = 100  # TCP sessions from one address
    memory_bytes: int = MEMORY_BYTES_MAX  # all send queues together; parse lowers it on a small host
    rcvbuf_bytes: int = 32 * 1024 * 1024  # UDP: the kernel's buffer for a burst (0.1 s at 200,000 x 1,400 B)

    def allows(self, host: str) -> bool:
        if not self.allow:
            return True
        ip = ipaddress.ip_address(host.partition("%")[0])  # a link-local peer carries its scope
        ip = getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
        return any(ip in net for net in self._networks)

    @functools.cached_property
    def _networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
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
    forwarding: ForwardingSettings
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
            forwarding=ForwardingSettings(**{**forwarding, "mode": Mode(forwarding["mode"]),
                                             "subreceivers": _endpoints(forwarding["subreceivers"])}),
            recording=Recording(**{**recording,
                                   "dump_insert_processes": _endpoints(recording["dump_insert_processes"])}),
            template_limits=TemplateLimits(**data.get("template_limits", {})),
            limits=Limits(**{**data.get("limits", {}), "allow": tuple(data.get("limits", {}).get("allow", ()))}))


def _endpoints(items: list[dict[str, Any]]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(**e) for e in items)


def _nest_flat(data: dict[str, Any]) -> dict[str, Any]:
    """The flat form of releases before the settings groups. A supervisor restarted in place for an upgrade
    reads the running receivers from the adopt file its predecessor wrote in that form."""
    flat = {**data, "max_flows_per_file": data["fw_max_queue_size"]}

    def group(cls: type) -> dict[str, Any]:
        return {f.name: flat[f.name] for f in dataclasses.fields(cls) if f.name in flat}  # newer keys: defaults

    return {"stream": flat["stream"], "index": flat["index"], "taskset": flat["taskset"], "listen": group(Listen),
            "forwarding": group(ForwardingSettings), "recording": group(Recording)}


def live_change_impossible(old: ReceiverConfig, new: ReceiverConfig) -> bool:
    """True when the new settings need a new handler process (a new listening socket or CPU); forwarding
    and recording settings change in place."""
    return ((old.stream, old.index, old.listen, old.taskset, old.forwarding.sub_source)
            != (new.stream, new.index, new.listen, new.taskset, new.forwarding.sub_source))


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
