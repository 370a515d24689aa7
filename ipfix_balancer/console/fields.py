"""The receiver form: the manual's fields (its labels, its order) and the settings it lacks, each bound to
its ``.env`` parameter; and the mapping of check-config's problems back onto the fields."""

from __future__ import annotations

import dataclasses
import re

from ..config.model import ForwardingSettings, Limits, TemplateLimits
from ..config.parse import receiver_key

STREAM = "stream"  # the form's name of "Receiver type": it is the STREAM part of every key, not a param
# "Receiver type" as the manual's GUI names it (its Fullflow receiver is "Netflow"), for each stream.
RECEIVER_TYPES = {"FULLFLOW": "Netflow", "CLICKSTREAM": "Clickstream", "DNSFLOW": "DNS flow"}


@dataclasses.dataclass(frozen=True)
class Field:
    label: str
    param: str  # IPFIX_<STREAM>_<param>[i]
    choices: tuple[str, ...] = ()  # a select; the first is the default
    placeholder: str = ""  # what an empty input means

    @property
    def id(self) -> str:
        return self.param.lower()

    def default(self) -> str:
        return self.choices[0] if self.choices else ""


# The manual's form, in its order (three columns of four in the manual's screenshot).
MANUAL = (
    Field("Port type", "PORT_TYPE", ("tcp", "udp")),
    Field("Port", "PORT", placeholder="1500 / 1501 / 1502 for index 0"),
    Field("Rotate in minutes", "ROTATE_MINUTES", placeholder="10 / 12 / 10"),
    Field("Rotate in seconds", "ROTATE_DELAY_SECONDS", placeholder="0: use minutes"),
    Field("Rotate by flows", "FW_MAX_QUEUE_SIZE", placeholder="0: off"),
    Field("Export", "DUMP_INSERT_PROCESSES", placeholder="10.0.0.2/9920/tcp,10.0.0.3/3440/"),
    Field("DPI ID", "DPI_ID", placeholder="-1: position in the stream"),
    Field("Balancer", "BALANCER", ("Disabled", "RoundRobin", "All")),
    Field("Balancer subreceivers", "BALANCER_SUB", placeholder="10.0.0.2/9920,10.0.0.3/3440"),
    Field("Balancer subreceivers type", "BALANCER_SUB_PROTO", ("tcp", "udp")),
    Field("Balancer auto", "BALANCER_AUTO", ("Disabled", "Enabled")),
)
# Settings the manual's form lacks: the collapsed "More" section (tests/console check that every receiver
# parameter of config/parse.py has its field here or above, with a label written for people).
MORE = (
    Field("Bind address", "BIND", placeholder="0.0.0.0"),
    Field("CPU (taskset)", "BALANCER_TASKSET", placeholder="not pinned"),
    Field("Queue size per subreceiver (bytes)", "QUEUE_BYTES", placeholder="67108864"),
    Field("Template resend to UDP subreceivers (s)", "TEMPLATE_REFRESH", placeholder="60"),
    Field("Dump directory", "DUMP_DIR", placeholder="/var/fast_ipfix_balancer/dump/<stream>/"),
    Field("Dump spool limit (bytes)", "SPOOL_BYTES", placeholder="0: no limit"),
    Field("Templates per session and ODID, at most", "TEMPLATES_MAX", placeholder=str(TemplateLimits.templates_max)),
    Field("ODIDs per exporter session, at most", "ODIDS_MAX", placeholder=str(TemplateLimits.odids_max)),
    Field("Template bytes per exporter session, at most", "TEMPLATE_BYTES_MAX", placeholder=str(TemplateLimits.template_bytes_max)),
    Field("Subreceiver stalled after (s)", "STALL_SECONDS", placeholder="5"),
    Field("Delivery after the exporter left, at most (s)", "DRAIN_SECONDS", placeholder=str(ForwardingSettings.drain_seconds)),
    Field("Source address towards subreceivers", "BALANCER_SUB_SOURCE", ("balancer", "exporter")),
    Field("Exporters allowed (addresses or networks)", "ALLOW", placeholder="anyone"),
    Field("Exporter idle timeout (s)", "IDLE_TIMEOUT", placeholder=f"{Limits.idle_timeout} (0: never)"),
    Field("Exporter sessions, at most", "MAX_SESSIONS", placeholder=str(Limits.max_sessions)),
    Field("Exporter sessions per address, at most", "MAX_SESSIONS_PER_SOURCE", placeholder=str(Limits.max_sessions_per_source)),
    Field("Queue memory of the handler (bytes)", "MEMORY_BYTES", placeholder="1 GiB, or a quarter of the memory if less"),
    Field("UDP receive buffer (bytes)", "RCVBUF_BYTES", placeholder=str(Limits.rcvbuf_bytes)),
)
FIELDS = MANUAL + MORE
_LEADING_KEY = re.compile(r"(IPFIX_[A-Z_]+(?:\[[0-9]+\])?)[ =:]")


def form_values(written: dict[str, str]) -> dict[str, str]:
    """What the form shows for a receiver's keys as written: selects matched case-insensitively (the
    balancer takes any case), a missing select key as its default, a missing text key as empty."""
    out = {}
    for f in FIELDS:
        value = written.get(f.param, "")
        if f.choices:
            value = next((c for c in f.choices if c.lower() == value.lower()), value or f.default())
        out[f.param] = value
    return out


def submitted(form, written: dict[str, str] | None) -> dict[str, str]:
    """The values to write for a receiver from the submitted form. An unchanged value keeps its spelling
    in the file; a select left at its default on an existing receiver that had no key adds none."""
    out = {}
    for f in FIELDS:
        value = str(form.get(f.param, "")).strip()
        if written is not None:
            old = written.get(f.param)
            if old is None and f.choices and value == f.default():
                value = ""
            elif old is not None and value.lower() == old.lower() and f.choices:
                value = old
        out[f.param] = value
    return out


def field_problems(problems: list[str], stream: str, index: int) -> tuple[dict[str, list[str]], list[str]]:
    """check-config's problems split into those about a field of this receiver (by param, each prefixed
    with the field's label, so the message names it) and the rest."""
    labels = {f.param: f.label for f in FIELDS}
    by_field: dict[str, list[str]] = {}
    rest = []
    for problem in problems:
        m = _LEADING_KEY.match(problem)
        named = receiver_key(m.group(1)) if m else None
        if named and named[:2] == (stream, index) and named[2] in labels:
            by_field.setdefault(named[2], []).append(f"{labels[named[2]]}: {problem}")
        else:
            rest.append(problem)
    return by_field, rest


def stream_choices() -> list[tuple[str, str]]:
    return list(RECEIVER_TYPES.items())
