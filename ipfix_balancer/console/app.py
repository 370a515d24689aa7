"""The web console's pages (Starlette, server-rendered jinja2; a little JavaScript only refreshes tables).

Everything but the login page and the static assets needs a session. A session is created only by a
successful login (the login form's CSRF token is signed, not stored: anonymous visitors cost no memory and
cannot push the operator's session out of the table); it lives in this process's memory only, so a
restarted console asks for the token again. Failed logins are throttled per address and in all
(``core.admission.FailureThrottle``). A request body is refused past MAX_BODY before anything parses it
(``BodyLimit``). Blocking work (reading status with psutil, waiting for a reload's outcome) runs in the
thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import config as config_mod
from ..control import reload as reload_mod
from ..control import rundir
from ..control import status as status_mod
from ..core.admission import FailureThrottle
from ..core.history import History
from ..logs import Throttle
from ..recording.dumpfile import dump_prefix
from . import charts, envfile, fields, logsource

HERE = os.path.dirname(__file__)
COOKIE = "ipfix_console"
SESSION_IDLE = 8 * 3600.0  # seconds without a request before a session ends
MAX_SESSIONS = 64  # the oldest is dropped beyond: memory stays bounded whatever a client does
WRONG_TOKEN_DELAY = 1.0  # seconds before answering a wrong token: guessing stays slow
LOGIN_FORM_SECONDS = 3600.0  # a login form's signed CSRF token is good for this long
MAX_BODY = 256 * 1024  # bytes of a request body: a receiver form is a few KB
MAX_INDEX_DIGITS = 6  # a receiver index in a URL or a form: longer is no receiver (int() of 5,000 digits fails)
LOG_LINES = 500  # shown
LOG_SCAN = 5000  # read from the journal, before filtering
SAMPLE_PERIOD = 2.0  # seconds between two samples of the status documents for the charts
LEVELS = ("debug", "info", "warning", "error", "critical")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclasses.dataclass
class LoginSession:
    csrf: str
    authenticated: bool = False
    seen: float = dataclasses.field(default_factory=time.monotonic)
    # The outcome of the last Apply or Delete, shown once by the page it redirects to (Post/Redirect/Get).
    outcome: tuple[list[str], list[str]] | None = None


class ConsoleState:
    """The state of one console process: its token, sessions and the charts' history."""

    def __init__(self, settings: config_mod.Console, config_path: str, run_dir: str, token: str, log):
        self.settings, self.config_path, self.run_dir, self.token, self.log = \
            settings, config_path, run_dir, token, log
        self.sessions: OrderedDict[str, LoginSession] = OrderedDict()  # logged-in sessions only
        self.login_key = secrets.token_bytes(32)  # signs the login form's CSRF token
        self.failures = FailureThrottle()
        self.throttle = Throttle(log)  # failed and refused logins: one line per address per minute
        self.history = History()  # kept by this process: a restarted console starts its charts afresh
        self.templates = Jinja2Templates(directory=os.path.join(HERE, "templates"))  # autoescapes .html
        self.templates.env.filters.update(utc=_utc, duration=_duration)

    # -- sessions --------------------------------------------------------------------------------
    def session(self, request: Request) -> tuple[str, LoginSession] | None:
        sid = request.cookies.get(COOKIE, "")
        found = self.sessions.get(sid)
        if found is None or time.monotonic() - found.seen > SESSION_IDLE:
            self.sessions.pop(sid, None)
            return None
        found.seen = time.monotonic()
        self.sessions.move_to_end(sid)
        return sid, found

    def new_session(self) -> tuple[str, LoginSession]:
        """A logged-in session (the only kind that is kept)."""
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = found = LoginSession(csrf=secrets.token_urlsafe(32), authenticated=True)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return sid, found

    def login_csrf(self, now: float) -> str:
        """A login form's CSRF token: its time, signed; nothing is stored for it."""
        stamp = str(int(now))
        return f"{stamp}.{hmac.new(self.login_key, stamp.encode(), 'sha256').hexdigest()}"

    def login_csrf_valid(self, token: str, now: float) -> bool:
        stamp, _, mac = token.partition(".")
        good = hmac.new(self.login_key, stamp.encode(), "sha256").hexdigest()
        return (hmac.compare_digest(mac, good) and stamp.isdigit() and len(stamp) <= 12
                and 0 <= now - int(stamp) <= LOGIN_FORM_SECONDS)

    def set_cookie(self, response: Response, sid: str) -> Response:
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", secure=bool(self.settings.tls_cert),
                            path="/")
        return response

    def render(self, request: Request, name: str, session: LoginSession, status_code: int = 200, **context) -> Response:
        context.update(csrf=session.csrf, authenticated=session.authenticated, path=request.url.path)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code,
                                               headers=SECURITY_HEADERS)

    # -- data ------------------------------------------------------------------------------------
    def receiver_rows(self, text: str, report: status_mod.StatusReport) -> list[dict]:
        """One row per receiver of the file (its effective settings when the file is valid, else as
        written), joined with its handler's live state. Called in a worker thread (see _check)."""
        try:
            effective = {(rc.stream, rc.index): rc for rc in config_mod.load_text(text, self.config_path).receivers}
        except config_mod.ConfigError:
            effective = {}
        written = envfile.EnvFile(text).receivers()
        live = {(h.doc.stream, h.doc.index): h for h in report.handlers}
        return [{"stream": stream, "title": fields.RECEIVER_TYPES[stream], "index": index,
                 "settings": fields.form_values(values), "rc": effective.get((stream, index)),
                 "handler": live.get((stream, index)), "renumbered": renumbered(effective, written, stream, index)}
                for (stream, index), values in written.items()]

    def sample(self, report: status_mod.StatusReport, now: float) -> None:
        """Fold one look at the handlers' status documents into the charts' history."""
        for h in report.handlers:
            d = h.doc
            self.history.record(
                d.name, now, at=d.time, state="up" if h.alive and not h.stale else "down",
                counters={"msgs_in": d.msgs_in, "bytes_in": d.bytes_in,
                          "msgs_out": sum(s.msgs_out for s in d.subreceivers),
                          "bytes_out": sum(s.bytes_out for s in d.subreceivers), **_drops(d.drops_by_reason)},
                gauges={"queued_bytes": d.queued_bytes, "sessions": d.connections})
            for s in d.subreceivers:
                self.history.record(sub_key(d.name, s.subreceiver), now, at=d.time, state=s.state,
                                    counters={"msgs_out": s.msgs_out, "bytes_out": s.bytes_out,
                                              **_drops(s.drops_by_reason)},
                                    gauges={"queued_bytes": s.queued_bytes})
        self.history.expire(now)

    def log_lines(self, stream: str, level: str, text: str, limit: int = LOG_LINES) -> tuple[str, list[dict]]:
        """(source, the newest ``limit`` lines matching the filters, newest first). ``text`` is found in any
        value of a line, ignoring case."""
        source, lines = logsource.recent(rundir.log_ring_path(self.run_dir), LOG_SCAN)
        least = LEVELS.index(level) if level in LEVELS else 0
        text = text.lower()
        out = []
        for doc in reversed(lines):
            if stream and str(doc.get("stream", "")).lower() != stream.lower():
                continue
            if (LEVELS.index(doc["level"]) if doc.get("level") in LEVELS else 0) < least:
                continue
            if text and not any(text in str(v).lower() for v in doc.values()):
                continue
            out.append(doc)
            if len(out) >= limit:
                break
        return source, out


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _duration(seconds: float) -> str:
    """An age in the largest two units: "3 d 4 h", "5 min 2 s"."""
    s = max(0, int(seconds))
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "min"), (s % 60, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), len(parts) - 1)
    return " ".join(f"{n} {unit}" for n, unit in parts[first:first + 2])


def sub_key(handler: str, subreceiver: str) -> str:
    """A subreceiver's name in the history: its handler's and its own."""
    return f"{handler} {subreceiver}"


def _drops(by_reason: dict[str, int]) -> dict[str, int]:
    return {f"drops:{reason}": n for reason, n in by_reason.items()}


def renumbered(effective: dict[tuple[str, int], config_mod.ReceiverConfig], written: dict, stream: str,
               index: int) -> list[str]:
    """What deleting (stream, index) renumbers, in words: with DPI_ID -1 (the default) a receiver's DPI ID
    is its position in its stream, so each later receiver of the stream that keeps the default moves down
    one, and so do the names of the dump files it records (itself, or its balancer-auto recorders)."""
    same = sorted(i for s, i in effective if s == stream)
    if index not in same:
        return []  # the file does not load as it is: nothing to compare
    out = []
    for later in same[same.index(index) + 1:]:
        if written.get((stream, later), {}).get("DPI_ID", "").strip() in ("", "-1"):
            rc = effective[(stream, later)]
            old = rc.recording.dpi_id
            line = f"{stream.lower()}[{later}]: DPI ID {old} becomes {old - 1}"
            if rc.forwarding.mode is config_mod.Mode.DISABLED or rc.forwarding.balancer_auto:
                line += (f"; its dump files are named {dump_prefix(stream, old - 1)}… instead of "
                         f"{dump_prefix(stream, old)}…")
            out.append(line)
    return out


def _guarded(handler, method: str):
    """Wrap an endpoint: no session or not logged in -> the login page; POST without the session's CSRF
    token -> 403. The endpoint gets (console, request, session id, session[, form])."""
    async def endpoint(request: Request) -> Response:
        console: ConsoleState = request.app.state.console
        found = console.session(request)
        if found is None or not found[1].authenticated:
            return RedirectResponse("/login", status_code=303)
        if method == "POST":
            form = await request.form()
            if not hmac.compare_digest(str(form.get("csrf", "")), found[1].csrf):
                return Response("invalid or missing CSRF token; reload the page", status_code=403,
                                headers=SECURITY_HEADERS)
            return await handler(console, request, found[1], form)
        return await handler(console, request, found[1])
    return endpoint


# -- login -------------------------------------------------------------------------------------------
def _login_form(console: ConsoleState, request: Request, status_code: int = 200, error: str = "") -> Response:
    """The login page, with a fresh signed CSRF token (no session: one is made only by a login)."""
    form = LoginSession(csrf=console.login_csrf(time.time()))
    return console.render(request, "login.html", form, status_code=status_code, error=error,
                          token_file=console.settings.token_file)


async def login_page(request: Request) -> Response:
    console: ConsoleState = request.app.state.console
    found = console.session(request)
    if found is not None and found[1].authenticated:
        return RedirectResponse("/receivers", status_code=303)
    return _login_form(console, request)


async def login(request: Request) -> Response:
    console: ConsoleState = request.app.state.console
    client = request.client.host if request.client else ""
    now = time.monotonic()
    if console.failures.blocked(client, now):  # refused unheard: the token is not even compared
        console.throttle.warning("console_login_throttled", client, client=client,
                                 action="refused for up to a minute")
        return _login_form(console, request, 429, "Too many wrong tokens: try again in a minute.")
    form = await request.form()
    if not console.login_csrf_valid(str(form.get("csrf", "")), time.time()):
        return RedirectResponse("/login", status_code=303)  # stale form: a fresh one with a fresh token
    given = str(form.get("token", "")).strip()
    if not hmac.compare_digest(given.encode(), console.token.encode()):
        console.failures.failed(client, now)
        console.throttle.warning("console_login_failed", client, client=client)
        await asyncio.sleep(WRONG_TOKEN_DELAY)
        return _login_form(console, request, 401, "Wrong token.")
    console.sessions.pop(request.cookies.get(COOKIE, ""), None)  # a new session id: a planted cookie gains nothing
    sid, _session = console.new_session()
    console.log.info("console_login", client=client)
    return console.set_cookie(RedirectResponse("/receivers", status_code=303), sid)


async def logout(console: ConsoleState, request: Request, session: LoginSession, form) -> Response:
    console.sessions.pop(request.cookies.get(COOKIE, ""), None)
    return RedirectResponse("/login", status_code=303)


# -- receivers ---------------------------------------------------------------------------------------
async def _table(console: ConsoleState) -> dict:
    """The receiver table's rows, and the digest of the file they come from (for Delete)."""
    text = envfile.read(console.config_path)
    report = await run_in_threadpool(status_mod.collect, console.run_dir)
    return {"rows": await run_in_threadpool(console.receiver_rows, text, report), "digest": envfile.digest(text)}


async def receivers(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    message, problems = session.outcome or ([], [])
    session.outcome = None  # shown once: a refresh of the page shows the table alone
    return console.render(request, "receivers.html", session, message=message, problems=problems,
                          config_path=console.config_path, **await _table(console))


def _outcome(session: LoginSession, message: list[str] | None = None, problems: list[str] | None = None) -> Response:
    """Post/Redirect/Get: the outcome goes with the session to the receiver table, so refreshing the page
    the browser lands on submits nothing again."""
    session.outcome = (message or [], problems or [])
    return RedirectResponse("/receivers", status_code=303)


async def receivers_table(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    """The table alone, for the page's refresh."""
    return console.render(request, "receivers_table.html", session, **await _table(console))


def _form(console: ConsoleState, request: Request, session: LoginSession, *, stream: str, index: int | None,
          values: dict, digest: str, status_code: int = 200, errors: dict | None = None,
          problems: list[str] | None = None, original_stream: str | None = None) -> Response:
    """The receiver form; ``original_stream``/``index`` name the receiver being edited (index None: a new one),
    ``stream`` is the Receiver type selected."""
    return console.render(request, "form.html", session, status_code=status_code, stream=stream, index=index,
                          original_stream=original_stream or stream,
                          values=values, digest=digest, manual=fields.MANUAL, more=fields.MORE,
                          streams=fields.stream_choices(), errors=errors or {}, problems=problems or [],
                          more_open=any(f.param in (errors or {}) for f in fields.MORE),
                          first_error=next((f.param for f in fields.FIELDS if f.param in (errors or {})), None))


async def new_receiver(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    text = envfile.read(console.config_path)
    return _form(console, request, session, stream="FULLFLOW", index=None, values=fields.form_values({}),
                 digest=envfile.digest(text))


async def edit_receiver(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    stream, index = request.path_params["stream"], request.path_params["index"]
    text = envfile.read(console.config_path)
    written = envfile.EnvFile(text).receivers().get((stream, index))
    if written is None:
        return _outcome(session, problems=[f"{stream.lower()}[{index}] is not in the file"])
    return _form(console, request, session, stream=stream, index=index, values=fields.form_values(written),
                 digest=envfile.digest(text))


async def apply_receiver(console: ConsoleState, request: Request, session: LoginSession, form) -> Response:
    """Validate the edited file with check-config's checker, write it atomically, reload, show the outcome."""
    text = envfile.read(console.config_path)
    env = envfile.EnvFile(text)
    stream = str(form.get(fields.STREAM, ""))
    original = form.get("index", "")
    original_stream = str(form.get("original_stream", stream))
    if stream not in envfile.TITLES or original_stream not in envfile.TITLES:
        return Response("unknown receiver type", status_code=400, headers=SECURITY_HEADERS)
    index = int(original) if str(original).isdigit() and len(str(original)) <= MAX_INDEX_DIGITS else None
    written = env.receivers().get((original_stream, index)) if index is not None else None
    values = fields.submitted(form, written if original_stream == stream else None)
    shown = {f.param: str(form.get(f.param, "")) for f in fields.FIELDS}
    edited = index

    def again(status_code: int, **kw) -> Response:  # the form as submitted, for the same receiver
        return _form(console, request, session, stream=stream, index=edited, original_stream=original_stream,
                     values=shown, digest=str(form.get("digest", "")), status_code=status_code, **kw)

    if not hmac.compare_digest(str(form.get("digest", "")), envfile.digest(text)):
        return again(409, problems=[f"{console.config_path} changed on disk since this form was loaded; nothing "
                                    "was written. Cancel and edit again to start from the file as it is now."])
    if index is not None and written is None:
        return again(409, problems=[f"{original_stream.lower()}[{index}] is no longer in the file; nothing was "
                                    "written"])
    if index is None or original_stream != stream:
        if index is not None:
            env.delete_receiver(original_stream, index)
        index = env.next_index(stream)
    env.set_receiver(stream, index, values)
    new_text = env.text()
    try:
        await _check(console, new_text)
    except config_mod.ConfigError as err:
        by_field, rest = fields.field_problems(err.problems, stream, index)
        return again(422, errors=by_field, problems=rest)
    return await _write_and_reload(console, request, session, text, new_text)


async def delete_receiver(console: ConsoleState, request: Request, session: LoginSession, form) -> Response:
    stream, index = request.path_params["stream"], request.path_params["index"]
    text = envfile.read(console.config_path)
    if not hmac.compare_digest(str(form.get("digest", "")), envfile.digest(text)):
        return _outcome(session, problems=[
            f"{console.config_path} changed on disk since this page was loaded; nothing was deleted."])
    env = envfile.EnvFile(text)
    env.delete_receiver(stream, index)
    try:
        await _check(console, env.text())
    except config_mod.ConfigError as err:
        return _outcome(session, problems=err.problems)
    return await _write_and_reload(console, request, session, text, env.text())


async def _check(console: ConsoleState, text: str) -> None:
    """check-config's checker, off the event loop: it asks netlink (pyroute2) for this host's addresses,
    which refuses to run inside a running asyncio loop. Raises ConfigError."""
    await run_in_threadpool(config_mod.load_text, text, console.config_path)


async def _write_and_reload(console: ConsoleState, request: Request, session: LoginSession, old: str, new: str) -> Response:
    if new != old:
        envfile.write_atomic(console.config_path, new, old)
        console.log.info("console_config_written", config=console.config_path)
    try:
        outcome = await run_in_threadpool(reload_mod.request, console.run_dir)
    except (reload_mod.NotRunning, TimeoutError) as exc:
        return _outcome(session, problems=[f"written, but not applied: {exc}"])
    if outcome.result == reload_mod.REFUSED:
        # (a new port another process holds): the file goes back to what runs, so the table, the next
        # restart and the file on disk all tell the same story
        if new != old:
            envfile.write_atomic(console.config_path, old, new)
            console.log.warning("console_config_restored", config=console.config_path)
        return _outcome(session, problems=outcome.lines() + (
            [f"{console.config_path} was restored to the running configuration"] if new != old else []))
    return _outcome(session, message=outcome.lines())


# -- logs, status --------------------------------------------------------------------------------
def _log_filters(request: Request) -> tuple[str, str, str]:
    q = request.query_params
    return q.get("stream", ""), q.get("level", ""), q.get("q", "")


async def logs_page(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    stream, level, text = _log_filters(request)
    source, lines = await run_in_threadpool(console.log_lines, stream, level, text)
    name = "logs_table.html" if request.query_params.get("part") == "table" else "logs.html"
    return console.render(request, name, session, lines=lines, source=source, stream=stream, level=level,
                          q=text, levels=LEVELS,
                          streams=["supervisor", "console", *envfile.TITLES])


async def logs_download(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    """Every line the filters match (of the last LOG_SCAN read), oldest first, one JSON document a line."""
    _source, lines = await run_in_threadpool(console.log_lines, *_log_filters(request), LOG_SCAN)
    body = "".join(json.dumps(doc, default=str) + "\n" for doc in reversed(lines))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Response(body, media_type="application/x-ndjson", headers={
        **SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="ipfix-balancer-logs-{stamp}.jsonl"'})


async def status_page(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    report = await run_in_threadpool(status_mod.collect, console.run_dir)
    name = "status_table.html" if request.query_params.get("part") == "table" else "status.html"
    now = time.time()
    overview = [charts.render(console.history, h.doc.name, charts.HANDLER[0], now, caption=h.doc.name)
                for h in report.handlers]
    return console.render(request, name, session, report=report, now=now, overview=overview)


async def receiver_page(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    """One receiver: its charts, subreceivers, exporter sessions and recorder; the live part is refreshed."""
    stream, index = request.path_params["stream"], request.path_params["index"]
    if stream not in envfile.TITLES:
        return Response("unknown receiver type", status_code=404, headers=SECURITY_HEADERS)
    report = await run_in_threadpool(status_mod.collect, console.run_dir)
    handler = next((h for h in report.handlers if (h.doc.stream, h.doc.index) == (stream, index)), None)
    name = f"{stream.lower()}[{index}]"
    now = time.time()
    subs = [] if handler is None else [
        (s, charts.charts(console.history, sub_key(name, s.subreceiver), charts.SUBRECEIVER, now))
        for s in handler.doc.subreceivers]
    page = "receiver_live.html" if request.query_params.get("part") == "live" else "receiver.html"
    return console.render(request, page, session, receiver=name, stream=stream, index=index,
                          title=fields.RECEIVER_TYPES[stream], h=handler, now=now,
                          charts=charts.charts(console.history, name, charts.HANDLER, now), subs=subs)


async def home(console: ConsoleState, request: Request, session: LoginSession) -> Response:
    return RedirectResponse("/receivers", status_code=303)


async def _sampler(console: ConsoleState) -> None:
    """Feed the charts' history for as long as the console runs, whether or not anyone looks. A failure is
    logged when it starts, not every period."""
    failing = False
    while True:
        try:
            report = await run_in_threadpool(status_mod.collect, console.run_dir)
            console.sample(report, time.time())
            failing = False
        except Exception as exc:  # noqa: BLE001 - the charts must not stop for one bad look
            if not failing:
                console.log.warning("console_sample_failed", reason=f"{type(exc).__name__}: {exc}")
            failing = True
        await asyncio.sleep(SAMPLE_PERIOD)


class _IndexConvertor(Convertor):
    """A receiver index in a path: at most MAX_INDEX_DIGITS digits (more is a 404, not int()'s ValueError)."""
    regex = f"[0-9]{{1,{MAX_INDEX_DIGITS}}}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("index", _IndexConvertor())


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body longer than MAX_BODY is answered 413 before any of it is parsed, by its
    Content-Length or, streamed without one, as soon as the bytes received pass it. Memory per request
    stays bounded whatever a client sends, before and after login."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or len(length) > 12 or int(length) > MAX_BODY:
            return await _too_large(send)
        seen, started = 0, False

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise _TooLarge
            return message

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watched)
        except _TooLarge:
            if not started:
                await _too_large(send)


async def _too_large(send) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": f"request body over {MAX_BODY} bytes\n".encode()})


def make_app(console: ConsoleState) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(_sampler(console))
        yield
        task.cancel()

    def get(path, handler):
        return Route(path, _guarded(handler, "GET"), methods=["GET"])

    def post(path, handler):
        return Route(path, _guarded(handler, "POST"), methods=["POST"])

    app = Starlette(lifespan=lifespan, routes=[
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        post("/logout", logout),
        get("/", home),
        get("/receivers", receivers),
        get("/receivers/table", receivers_table),
        get("/receivers/new", new_receiver),
        get("/receivers/{stream}/{index:index}", receiver_page),
        get("/receivers/{stream}/{index:index}/edit", edit_receiver),
        post("/receivers/apply", apply_receiver),
        post("/receivers/{stream}/{index:index}/delete", delete_receiver),
        get("/logs", logs_page),
        get("/logs/download", logs_download),
        get("/status", status_page),
        Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
    ], middleware=[Middleware(BodyLimit)])
    app.state.console = console
    return app
