"""The receiver form: the manual's fields (its labels, its order) and the settings it lacks, each bound to
its ``.env`` parameter; and the mapping of check-config's problems back onto the fields."""

from __future__ import annotations

import dataclasses
import re

from ..config import receiver_key, receiver_params
from .envfile import TITLES

STREAM = "stream"  # the form's name of "Receiver type": it is the STREAM part of every key, not a param


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
# Settings the manual's form lacks: the collapsed "More" section.
_MORE = (
    Field("Bind address", "BIND", placeholder="0.0.0.0"),
    Field("CPU (taskset)", "BALANCER_TASKSET", placeholder="not pinned"),
    Field("Queue bytes", "QUEUE_BYTES", placeholder="67108864"),
    Field("Template refresh (s)", "TEMPLATE_REFRESH", placeholder="60"),
    Field("Dump directory", "DUMP_DIR", placeholder="/var/fast_ipfix_balancer/dump/<stream>/"),
    Field("Spool bytes", "SPOOL_BYTES", placeholder="0: no limit"),
)
# A parameter added to config.py later gets a plain text field, so the form never lacks a setting.
MORE = _MORE + tuple(Field(p.replace("_", " ").capitalize(), p, placeholder="default")
                     for p in receiver_params() if p not in {f.param for f in MANUAL + _MORE})
FIELDS = MANUAL + MORE
RECEIVER_TYPE_LABEL = "Receiver type"
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
    return list(TITLES.items())
