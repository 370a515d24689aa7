"""Render the files the product ships from Jinja2 templates (``ipfix_balancer/skel/``).

    python -m ipfix_balancer.render NAME... [-o DIR]      NAME: unit, env, man, completion (or all)

- ``unit``: the systemd unit ``fast_ipfix_balancer.service`` (paths from the constants below);
- ``env``: the shipped configuration, the manual's example with its collectors on loopback (``STREAMS``);
- ``man``: the man page ``ipfix-balancer.8``, generated from the click commands of :mod:`ipfix_balancer.cli`
  (so every command and option the CLI has is documented, with its own help text);
- ``completion``: bash completion for ``ipfix-balancer``, click's own completion script.

The RPM build renders all four with the venv it ships (``-o DIR``) and installs them; ``etc/`` in the
repository holds the rendered unit and ``.env`` (a test checks they are what the templates give). One
NAME without ``-o`` prints the file to stdout. Build-time only: nothing here runs in the balancer.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import jinja2

from .config.parse import DEFAULT_CONFIG_PATH, DUMP_ROOT
from .control.privileges import SERVICE_USER, capabilities

UNIT = "fast_ipfix_balancer.service"
PROG = "ipfix-balancer"
PATHS = {
    "config_path": DEFAULT_CONFIG_PATH,
    "config_dir": os.path.dirname(DEFAULT_CONFIG_PATH),
    "run_dir": "/run/fast_ipfix_balancer",
    "dump_root": DUMP_ROOT,
    "bindir": "/usr/bin",
    "unitdir": "/usr/lib/systemd/system",
    "appdir": "/opt/fast_ipfix_balancer",
    "unit": UNIT,
    "syslog_identifier": "IPFIXcol2-balancer",
    "user": SERVICE_USER,  # the system user and group the RPM creates; the service runs as them
    "console": "127.0.0.1/8480",  # the web console, loopback only (docs/operations.md "Console")
}

# The manual's "Example of Configuration File" (etc/manual-example.env): ports, modes and CPUs as there,
# its collectors (10.19.3.x) replaced by loopback ports so the shipped file runs on any machine.
STREAMS = (
    {"key": "FULLFLOW", "title": "Fullflow", "port_type": "tcp", "port": 1500, "mode": "RoundRobin",
     "subs": ("127.0.0.1/9901", "127.0.0.1/9902", "127.0.0.1/9903"), "sub_proto": "tcp", "cpu": 61,
     "port_note": "; unique per receiver"},
    {"key": "CLICKSTREAM", "title": "Clickstream", "port_type": "tcp", "port": 1501, "mode": "RoundRobin",
     "subs": ("127.0.0.1/9911", "127.0.0.1/9912"), "sub_proto": "tcp", "cpu": 62, "port_note": ""},
    {"key": "DNSFLOW", "title": "DNS flow", "port_type": "tcp", "port": 1101, "mode": "RoundRobin",
     "subs": ("127.0.0.1/9921", "127.0.0.1/9922"), "sub_proto": "tcp", "cpu": 63,
     "port_note": " (the manual uses 1101; the default would be 1502)"},
)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

FILES = {   # NAME -> file name in the output directory
    "unit": UNIT,
    "env": "fast_ipfix_balancer.env",
    "man": f"{PROG}.8",
    "envman": f"{PROG}.env.5",
    "completion": PROG,
}


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("ipfix_balancer", "skel"), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["basename"] = os.path.basename
    env.filters["dirname"] = os.path.dirname
    env.filters["roff"] = roff
    env.filters["roff_opts"] = roff_opts
    env.filters["hyphens"] = lambda text: roff(text).replace("-", "\\-")
    return env


def roff(text: str) -> str:
    """Plain text -> roff body text: backslashes escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def roff_opts(text: str) -> str:
    """An option synopsis ('-c, --config PATH') with real hyphens and bold option names."""
    return re.sub(r"(?<![\w-])(--?[\w-]+)", lambda m: "\\fB" + m.group(1).replace("-", "\\-") + "\\fR", roff(text))


def unit(caps: tuple[str, ...] = ()) -> str:
    return _environment().get_template(f"{UNIT}.j2").render(capabilities=caps, **PATHS)


def env() -> str:
    return _environment().get_template("fast_ipfix_balancer.env.j2").render(streams=STREAMS, numbers=NUMBERS, **PATHS)


def _commands() -> list[dict]:
    """The visible click commands of ``ipfix-balancer`` (subcommands of groups as "group sub"), each with its
    help and its options' help."""
    import click

    from .cli import main

    def walk(group: click.Group, group_ctx: click.Context, prefix: str) -> list[dict]:
        out = []
        for name in group.list_commands(group_ctx):
            cmd = group.get_command(group_ctx, name)
            if cmd is None or cmd.hidden:
                continue
            ctx = click.Context(cmd, info_name=name, parent=group_ctx)
            options = [rec for p in cmd.get_params(ctx) if (rec := p.get_help_record(ctx)) is not None]
            args = " ".join(p.make_metavar(ctx) if _takes_ctx(p) else p.make_metavar()  # click >= 8.2 vs older
                            for p in cmd.get_params(ctx) if isinstance(p, click.Argument))
            out.append({"name": prefix + name, "help": _paragraphs(cmd.help or ""), "options": options,
                        "args": args})
            if isinstance(cmd, click.Group):
                out += walk(cmd, ctx, f"{prefix}{name} ")
        return out

    return walk(main, click.Context(main, info_name=PROG), "")


def _paragraphs(text: str) -> str:
    """A docstring's paragraphs, each on one line (roff fills them), blank lines between."""
    import click
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", click.unstyle(text).strip()) if p.strip())


def _takes_ctx(param) -> bool:
    import inspect
    return "ctx" in inspect.signature(param.make_metavar).parameters


def _stamp(date: str | None) -> dict:
    """A man page's version and date (reproducible builds: SOURCE_DATE_EPOCH when set)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fast_ipfix_balancer")
    except PackageNotFoundError:
        ver = "unknown"
    if date is None:
        epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
        stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch else \
            datetime.datetime.now(datetime.timezone.utc)
        date = stamp.strftime("%Y-%m-%d")
    return {"version": ver, "date": date}


def man(date: str | None = None) -> str:
    return _environment().get_template(f"{PROG}.8.j2").render(prog=PROG, commands=_commands(), **_stamp(date),
                                                              **PATHS)


def _configuration_doc() -> str:
    """docs/configuration.md of the source tree: beside the package in a checkout, else in the working
    directory (the RPM's %install renders from the unpacked sources with the installed package)."""
    doc = os.path.join("docs", "configuration.md")
    for path in (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), doc), doc):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError(f"{doc} not found: render envman from the source tree")


def md_roff(text: str) -> str:
    """One line of the documentation's Markdown -> roff: `code` bold, **strong** bold, links as their text, other
    than ASCII as groff's \\[uXXXX]."""
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text.strip())
    text = roff(text).replace("-", "\\-")
    text = re.sub(r"\*\*(.+?)\*\*", r"\\fB\1\\fR", text)
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def envman(date: str | None = None) -> str:
    """ipfix-balancer.env(5): docs/configuration.md's "Configuration reference" (paragraphs, and each table
    row as one key's entry), so the page and the documentation never disagree."""
    ref = _configuration_doc().split("\n## Configuration reference\n", 1)[1].split("\n### Configuration errors", 1)[0]
    intro, parts, environment = [], [], ""
    for block in (b.strip() for b in re.split(r"\n\s*\n", ref) if b.strip()):
        lines = block.splitlines()
        if lines[0].startswith("|"):
            receiver = lines[0].strip("| ").startswith("Key (")
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
            parts.append({"rows": [{
                "key": md_roff(f"`IPFIX_<STREAM>_{r[0].split('`')[1]}[i]`{r[0].split('`', 2)[2]}" if receiver else r[0]),
                "default": md_roff(r[1]), "meaning": md_roff(r[2]), "allowed": md_roff(r[3]),
                "mode": md_roff(r[4]) if len(r) > 4 else ""} for r in rows]})
        elif block.startswith("Environment variables"):
            environment = md_roff(" ".join(lines))
        else:
            text = md_roff(" ".join(line.removeprefix("- ") for line in lines))
            (parts.append({"text": text}) if parts else intro.append(text))
    return _environment().get_template(f"{PROG}.env.5.j2").render(
        intro=intro, parts=parts, environment=environment, **_stamp(date), **PATHS)


def completion() -> str:
    """click's bash completion script for ``ipfix-balancer`` (what ``_IPFIX_BALANCER_COMPLETE=bash_source``
    prints): completion asks the installed command itself, so new commands complete without a new script."""
    from click.shell_completion import BashComplete

    from .cli import main
    source = BashComplete(main, {}, PROG, "_IPFIX_BALANCER_COMPLETE").source()
    return source if source.endswith("\n") else source + "\n"


RENDER = {"unit": unit, "env": env, "man": man, "envman": envman, "completion": completion}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipfix_balancer.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", choices=[*RENDER, "all"], metavar="NAME",
                        help="unit, env, man, envman, completion or all")
    parser.add_argument("-o", "--out-dir", help=f"write each file there ({', '.join(FILES.values())})")
    parser.add_argument("--config", metavar="PATH", help="unit: grant the capabilities this .env needs")
    args = parser.parse_args(argv)
    render = dict(RENDER)
    if args.config is not None:
        from .config.parse import load
        caps = capabilities(load(args.config))
        render["unit"] = lambda: unit(caps)
    names = list(RENDER) if "all" in args.names else list(dict.fromkeys(args.names))
    if args.out_dir is None:
        if len(names) != 1:
            parser.error("more than one NAME needs --out-dir")
        sys.stdout.write(render[names[0]]())
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    for name in names:
        path = os.path.join(args.out_dir, FILES[name])
        with open(path, "w") as f:
            f.write(render[name]())
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
