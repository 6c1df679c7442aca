"""The console's pages and actions: a Starlette application rendered with Jinja2 templates.

Every page and action is declared with the RPC it stands for (``console.access``); one wrapper checks the
session, that its key is still valid, the role matrix, and on every POST the session's CSRF token, before the
handler runs. Handlers call the stores the RPCs call, off the event loop, with the signed-in key as the
actor, so the audit log records a change made here exactly as one made through the API.

Pages read without JavaScript: forms post and redirect; htmx (served from the package) only refreshes the
overview's live figures and follows the queue from the keyboard.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Protocol

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from posguard_server.api.auth import Authenticator
from posguard_server.console import access
from posguard_server.console.access import NAV, SIGNED_IN, permitted
from posguard_server.console.chart import Point, amounts_and_scores
from posguard_server.console.live import LiveStats
from posguard_server.console.sessions import Session, SessionStore
from posguard_server.domain.api_keys import Role
from posguard_server.domain.audit import AuditEvent
from posguard_server.domain.cases import (
    ASSIGNEE_MAX,
    CASE_ID_LENGTH,
    RESOLUTIONS,
    CaseFilter,
    CaseKind,
    CaseStatus,
    Resolution,
)
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.customers import ExternalRef, Transition, mask
from posguard_server.domain.enumeration import MISS_REASONS
from posguard_server.domain.errors import (
    ErrorKind,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PosguardError,
    ResourceExhausted,
    Unauthenticated,
)
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.policy import (
    LIST_NAME_PATTERN,
    NAME_PATTERN,
    REASON_MAX,
    VALUE_MAX,
    ListKind,
    ListType,
    Rule,
    RuleAction,
    RuleStatus,
    normalize_value,
)
from posguard_server.domain.risk import Decision, ModelScope
from posguard_server.domain.rule_language import MAX_EXPRESSION_LENGTH, RuleSyntaxError, compile_condition
from posguard_server.services.backtest import MAX_BACKTEST_DAYS, BacktestService
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.cases import SqlCaseStore
from posguard_server.store.customers import MakeNumber, SqlCustomerStore, StoredCustomer
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.policy import SqlPolicyStore
from posguard_server.store.risk_tables import MODEL_VERSION_MAX, OUTCOME_NOTE_MAX

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SIGNIN_COOKIE = "posguard_console_signin"
PAGE_SIZE = 50
CUSTOMER_TRANSACTIONS = 50
MAX_REASON = 500  # as the lifecycle and model RPCs
MAX_TOKEN = 200
MAX_NUMBER_INPUT = 64
_NOTE_WHITESPACE = str.maketrans("", "", "\n\r\t")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
_REPORT_FILE = re.compile(r"[a-z_]+\.(html|png)")
_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.ALREADY_EXISTS: 409,
    ErrorKind.FAILED_PRECONDITION: 409,
    ErrorKind.ABORTED: 409,
    ErrorKind.PERMISSION_DENIED: 403,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
}
# Pages allow scripts, styles, images and requests from the console itself and nothing else; no page may be
# framed (clickjacking). Reports are posguard's own HTML with inline styles: a sandbox with no script at all.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
REPORT_CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'; sandbox"
)

Handler = Callable[[Request, Session], Awaitable[Response]]


class Guard(Protocol):
    """The server's enumeration guard (``api.enumeration.FailureGuard``): the console's look-ups count too."""

    def check(self, caller: str, now: datetime) -> None: ...

    async def missed(self, caller: str, method: str, error: NotFound) -> PosguardError: ...


@dataclass(frozen=True, slots=True)
class ConsoleParts:
    """What the console works with: the server's own authenticator, stores, numbering and metrics."""

    authenticator: Authenticator
    key_valid: Callable[[str], bool]  # whether a key id still stands (not revoked); called off the loop
    customers: SqlCustomerStore
    cases: SqlCaseStore
    registry: SqlModelRegistry
    audit: SqlAuditStore
    policy: SqlPolicyStore
    backtests: BacktestService  # the BacktestRules RPC's own
    numbering: Numbering
    metrics: CollectorRegistry
    reports_dir: Path
    sessions: SessionStore
    secure: bool  # served over TLS: Secure cookies and HSTS
    guard: Guard  # a look-up naming nobody is a guess, as GetCustomer's is


def _now() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    """The request id a rendered form carries: submitting it twice replays the first answer."""
    return "console-" + secrets.token_hex(12)


def _fingerprint(action: str, **fields: object) -> str:
    """What a console action asks for, apart from its request id (as ``fingerprint`` is for an RPC)."""
    return hashlib.sha256(json.dumps([action, fields], sort_keys=True, default=str).encode()).hexdigest()


def _text(form: FormData | Mapping[str, Any], name: str) -> str:
    value = form.get(name, "")
    return value.strip() if isinstance(value, str) else ""


def _path_name(request: Request, param: str, pattern: re.Pattern[str], what: str) -> str:
    """The name in the page's path, refused unless it has the shape of the name of ``what``."""
    name = str(request.path_params[param])
    if not pattern.fullmatch(name):
        raise _invalid(param, f"is not the name of {what}")
    return name


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def _required_text(form: FormData, name: str, maximum: int, *, required: bool = True) -> str:
    value = _text(form, name)
    if required and not value:
        raise _invalid(name, "is required")
    if len(value) > maximum:
        raise _invalid(name, f"must be at most {maximum} characters")
    if not value.translate(_NOTE_WHITESPACE).isprintable():
        raise _invalid(name, "must not contain control characters other than line breaks and tabs")
    return value


class SecurityHeaders:
    """Headers every answer carries (a handler may set its own Content-Security-Policy first)."""

    def __init__(self, app: ASGIApp, *, secure: bool) -> None:
        self.app = app
        self.headers: list[tuple[bytes, bytes]] = [
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
        ]
        if secure:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(n, v) for n, v in self.headers if n not in present]
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                if not static and b"cache-control" not in present:
                    # Pages show customers and keys' work: no copy in a shared or back-button cache.
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Console:
    """The console application over ``parts``; ``app`` is the ASGI application to serve."""

    def __init__(self, parts: ConsoleParts) -> None:
        self.parts = parts
        self._declared: list[tuple[str, str, str]] = []
        self.live = LiveStats(parts.metrics)
        self.cookie = "__Host-posguard_console" if parts.secure else "posguard_console"
        environment = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        environment.globals["new_request_id"] = new_request_id
        environment.filters["when"] = _when
        self.templates = Jinja2Templates(env=environment)
        routes = [
            Route("/", self._root),
            Route("/signin", self._signin_page, methods=["GET"]),
            Route("/signin", self._signin, methods=["POST"]),
            self._route("/signout", SIGNED_IN, self._signout, "POST"),
            self._route("/overview", SIGNED_IN, self._overview),
            self._route("/overview/live", SIGNED_IN, self._overview_live),
            self._route("/numbers", access.GET_CUSTOMER, self._numbers),
            self._route("/numbers", access.GET_CUSTOMER, self._numbers_lookup, "POST"),
            *[
                self._route(f"/numbers/{t.value}", rpc, self._transition_handler(t), "POST")
                for t, rpc in TRANSITION_RPCS.items()
            ],
            self._route("/customers/{customer_id}", access.GET_CUSTOMER, self._customer),
            self._route("/watch", access.LIST_CASES, self._watch),
            self._route("/cases", access.LIST_CASES, self._cases),
            self._route("/cases/{case_id}", access.GET_CASE, self._case),
            self._route("/cases/{case_id}/assign", access.ASSIGN_CASE, self._assign, "POST"),
            self._route("/cases/{case_id}/resolve", access.RESOLVE_CASE, self._resolve, "POST"),
            self._route("/policy", access.LIST_LISTS, self._policy),
            self._route("/policy/lists", access.CREATE_LIST, self._create_list, "POST"),
            self._route("/policy/lists/{list_name}", access.LIST_ENTRIES, self._list),
            self._route("/policy/lists/{list_name}/add", access.ADD_LIST_ENTRY, self._add_entry, "POST"),
            self._route(
                "/policy/lists/{list_name}/remove", access.REMOVE_LIST_ENTRY, self._remove_entry, "POST"
            ),
            self._route("/policy/rules", access.LIST_RULES, self._rules),
            self._route("/policy/rules", access.CREATE_RULE, self._create_rule, "POST"),
            self._route("/policy/rules/{rule}/activate", access.ACTIVATE_RULE, self._activate, "POST"),
            self._route("/policy/rules/{rule}/retire", access.RETIRE_RULE, self._retire, "POST"),
            self._route("/policy/backtest", access.BACKTEST_RULES, self._backtest_page),
            self._route("/policy/backtest", access.BACKTEST_RULES, self._backtest, "POST"),
            self._route("/models", access.LIST_MODELS, self._models),
            self._route("/models/reports/{version}/{name}", access.LIST_MODELS, self._report),
            self._route("/models/promote", access.PROMOTE_MODEL, self._promote, "POST"),
            self._route("/models/rollback", access.ROLLBACK_MODEL, self._rollback, "POST"),
            self._route("/audit", access.LIST_AUDIT, self._audit),
            self._route("/audit/verify", access.VERIFY_AUDIT, self._verify),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        # (method, path, rpc) of every page and action: what the role-matrix tests walk.
        self.routes = [(method, path, rpc) for path, rpc, method in self._declared]
        starlette = Starlette(routes=routes, exception_handlers={Exception: self._unexpected})
        self.app: ASGIApp = SecurityHeaders(starlette, secure=parts.secure)

    # -- the guard every page and action passes ----------------------------------------------------------

    def _route(self, path: str, rpc: str, handler: Handler, method: str = "GET") -> Route:
        self._declared.append((path, rpc, method))

        async def endpoint(request: Request) -> Response:
            token = request.cookies.get(self.cookie)
            session = self.parts.sessions.get(token)
            if session is not None and not await asyncio.to_thread(self.parts.key_valid, session.key_id):
                # The key was revoked since sign-in: its sessions end with it.
                self.parts.sessions.end_key(session.key_id)
                session = None
            if session is None:
                return self._to_signin(request)
            if not permitted(session.roles, rpc):
                return self._render(
                    request, session, "error.html", {"title": "Not allowed", "message": _DENIED}, 403
                )
            if request.method == "POST":
                form = await request.form()
                sent = form.get("csrf")
                if not isinstance(sent, str) or not secrets.compare_digest(sent, session.csrf):
                    return self._render(
                        request,
                        session,
                        "error.html",
                        {"title": "Form expired", "message": _CSRF},
                        403,
                    )
            try:
                return await handler(request, session)
            except PosguardError as error:
                status = _STATUS.get(error.kind, 500)
                message = error.message if status != 500 else "the console could not do that"
                if isinstance(error, InvalidArgument):
                    message = "; ".join(f"{v.field} {v.description}" for v in error.violations)
                return self._render(
                    request, session, "error.html", {"title": "Not done", "message": message}, status
                )

        return Route(path, endpoint, methods=[method])

    def _to_signin(self, request: Request) -> Response:
        if request.headers.get("hx-request"):
            # An htmx poll of a session that ended: have the whole page go to the sign-in form.
            return Response(status_code=401, headers={"HX-Redirect": "/signin"})
        return RedirectResponse("/signin", status_code=303)

    async def _unexpected(self, request: Request, error: Exception) -> Response:
        log.error("console: unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return Response(
            "The console could not answer this request.", status_code=500, media_type="text/plain"
        )

    def _render(
        self,
        request: Request,
        session: Session | None,
        template: str,
        context: Mapping[str, Any],
        status: int = 200,
    ) -> Response:
        roles = session.roles if session is not None else frozenset()
        flashes: list[str] = []
        if session is not None:
            flashes, session.flashes = session.flashes, []
        full = {
            "session": session,
            "csrf": session.csrf if session is not None else "",
            "nav": [entry for entry in NAV if session is not None and permitted(roles, entry.rpc)],
            "can": lambda rpc: session is not None and permitted(roles, rpc),
            "rpc": access,
            "flashes": flashes,
            "shown": lambda number: _shown(number, roles),
            "path": request.url.path,
            **context,
        }
        return self.templates.TemplateResponse(request, template, full, status_code=status)

    # -- signing in and out ------------------------------------------------------------------------------

    async def _root(self, request: Request) -> Response:
        return RedirectResponse("/overview", status_code=303)

    def _signin_form(self, request: Request, message: str = "", status: int = 200) -> Response:
        # The form's CSRF token is also in a cookie of its own: a form posted from elsewhere has neither.
        token = secrets.token_urlsafe(32)
        response = self._render(
            request, None, "signin.html", {"signin_csrf": token, "message": message}, status
        )
        self._set_cookie(response, SIGNIN_COOKIE, token, max_age=900)
        return response

    async def _signin_page(self, request: Request) -> Response:
        if self.parts.sessions.get(request.cookies.get(self.cookie)) is not None:
            return RedirectResponse("/overview", status_code=303)
        return self._signin_form(request)

    async def _signin(self, request: Request) -> Response:
        form = await request.form()
        sent, expected = form.get("csrf"), request.cookies.get(SIGNIN_COOKIE)
        if not isinstance(sent, str) or not expected or not secrets.compare_digest(sent, expected):
            return self._signin_form(request, _CSRF, 403)
        token = _text(form, "api_key")
        if not token or len(token) > MAX_TOKEN:
            return self._signin_form(request, "Enter an API key.", 400)
        try:
            principal = await self.parts.authenticator.authenticate([("authorization", f"Bearer {token}")])
        except Unauthenticated:
            # The same words for every refusal; the key is never shown back.
            return self._signin_form(request, "That API key is not valid.", 401)
        except ResourceExhausted:
            return self._signin_form(request, "The server is busy; try again in a moment.", 429)
        if not permitted(principal.roles, SIGNED_IN):
            roles = ", ".join(sorted(r.value for r in principal.roles))
            return self._signin_form(request, f"Keys of role {roles} have no console pages.", 403)
        cookie, _ = self.parts.sessions.create(principal.key_id, principal.roles)
        await asyncio.to_thread(self._audit_session, "console.sign_in", principal.key_id)
        log.info("console: key %s signed in", principal.key_id)
        response = RedirectResponse("/overview", status_code=303)
        self._set_cookie(response, self.cookie, cookie, max_age=int(self.parts.sessions.lifetime_seconds))
        response.delete_cookie(
            SIGNIN_COOKIE, path="/", secure=self.parts.secure, httponly=True, samesite="strict"
        )
        return response

    async def _signout(self, request: Request, session: Session) -> Response:
        self.parts.sessions.end(request.cookies.get(self.cookie))
        await asyncio.to_thread(self._audit_session, "console.sign_out", session.key_id)
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(
            self.cookie, path="/", secure=self.parts.secure, httponly=True, samesite="strict"
        )
        return response

    def _audit_session(self, action: str, key_id: str) -> None:
        self.parts.audit.append(actor=key_id, action=action, subject=key_id, details={}, now=_now())

    def _set_cookie(self, response: Response, name: str, value: str, *, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            secure=self.parts.secure,
            httponly=True,
            samesite="strict",
        )

    # -- overview -----------------------------------------------------------------------------------------

    async def _overview(self, request: Request, session: Session) -> Response:
        models = None
        if permitted(session.roles, access.LIST_MODELS):
            models = await asyncio.to_thread(self._model_summary)
        return self._render(
            request, session, "overview.html", {"live": self.live.figures(), "models": models}
        )

    async def _overview_live(self, request: Request, session: Session) -> Response:
        return self._render(request, session, "_live.html", {"live": self.live.figures()})

    def _model_summary(self) -> dict[str, Any]:
        registry = self.parts.registry
        active_global, _ = registry.list_models(scope=ModelScope.GLOBAL, active_only=True, limit=5)
        active_customer, more = registry.list_models(scope=ModelScope.CUSTOMER, active_only=True, limit=500)
        by_version: dict[str, int] = {}
        for model in active_customer:
            by_version[model.version] = by_version.get(model.version, 0) + 1
        newest, _ = registry.list_models(limit=1)
        return {
            "global": active_global,
            "customer_versions": sorted(by_version.items()),
            "customer_more": more is not None,
            "last": newest[0] if newest else None,
        }

    # -- numbers and customers -------------------------------------------------------------------------------

    async def _numbers(self, request: Request, session: Session) -> Response:
        return self._render(request, session, "numbers.html", {"found": None, "query": {}})

    async def _numbers_lookup(self, request: Request, session: Session) -> Response:
        form = await request.form()
        by = _text(form, "by")
        number = external = None
        if by == "external":
            namespace = _required_text(form, "namespace", 64)
            value = _required_text(form, "value", 256)
            external = ExternalRef(namespace, value)
        else:
            number = self._number(_text(form, "number"), "number")
        stored = await self._look_up(session, number=number, external=external)
        query = {"by": by, "namespace": _text(form, "namespace"), "value": _text(form, "value")}
        return self._render(request, session, "numbers.html", {"found": stored.customer, "query": query})

    async def _look_up(
        self,
        session: Session,
        *,
        customer_id: str | None = None,
        number: str | None = None,
        external: ExternalRef | None = None,
    ) -> StoredCustomer:
        """A customer, as GetCustomer finds it: a key refused for guessing is refused here too, and a
        look-up naming nobody counts against the key's limit."""
        self.parts.guard.check(session.key_id, _now())
        try:
            return await asyncio.to_thread(
                self.parts.customers.get, customer_id=customer_id, number=number, external=external
            )
        except NotFound as error:
            if error.reason not in MISS_REASONS:
                raise
            raise await self.parts.guard.missed(session.key_id, "GetCustomer", error) from None

    def _number(self, value: str, field: str) -> str:
        if not value:
            raise _invalid(field, "is required")
        if len(value) > MAX_NUMBER_INPUT:
            raise _invalid(field, f"must be at most {MAX_NUMBER_INPUT} characters")
        recognised = self.parts.numbering.recognise(value)
        if recognised.parsed is None:
            raise _invalid(field, "is not a valid customer number")
        return recognised.parsed.number

    def _make_number(self, number: str) -> MakeNumber:
        """How a rotated number's successor is made: under the number's own scheme, as the RPCs do."""
        scheme = self.parts.numbering.recognise(number).scheme
        assert scheme is not None  # a recognised number is of a scheme this server knows
        return lambda prefix, counter: self.parts.numbering.make_number(scheme, prefix, counter)

    def _transition_handler(self, transition: Transition) -> Handler:
        async def handler(request: Request, session: Session) -> Response:
            form = await request.form()
            number = self._number(_text(form, "number"), "number")
            reason = _required_text(form, "reason", MAX_REASON)
            request_id = _required_text(form, "request_id", 64)
            stored, previous, replayed = await asyncio.to_thread(
                self.parts.customers.transition,
                number,
                transition,
                reason=reason,
                request_id=request_id,
                fingerprint=_fingerprint(transition.value, number=number, reason=reason),
                actor=session.key_id,
                now=_now(),
                make_number=self._make_number(number),
            )
            shown = _shown(number, session.roles)
            done = {
                Transition.SUSPEND: f"{shown} suspended.",
                Transition.REACTIVATE: f"{shown} reactivated.",
                Transition.REVOKE: f"{shown} revoked.",
                Transition.ROTATE: f"{_shown(previous, session.roles)} rotated; the new number is "
                f"{_shown(stored.customer.primary.number, session.roles)}.",
            }[transition]
            session.flashes.append(done + (" (already done by this form)" if replayed else ""))
            return RedirectResponse(f"/customers/{stored.customer.customer_id}", status_code=303)

        return handler

    async def _customer(self, request: Request, session: Session) -> Response:
        customer_id = request.path_params["customer_id"]
        if len(customer_id) > 32:
            raise _invalid("customer_id", "must be at most 32 characters")
        stored = await self._look_up(session, customer_id=customer_id)
        transactions = await asyncio.to_thread(
            self.parts.cases.customer_transactions, customer_id, limit=CUSTOMER_TRANSACTIONS
        )
        currency = transactions[0].currency if transactions else ""
        points = [
            Point(t.event_time, _major(t.amount_minor, t.currency), t.risk_score, _flagged(t.decision))
            for t in transactions
            if t.currency == currency
        ]
        return self._render(
            request,
            session,
            "customer.html",
            {
                "customer": stored.customer,
                "transactions": transactions,
                "chart": amounts_and_scores(points, currency),
                "amount": _amount,
            },
        )

    # -- cases --------------------------------------------------------------------------------------------

    async def _watch(self, request: Request, session: Session) -> Response:
        everything = request.query_params.get("all") == "1"
        where = CaseFilter(kind=CaseKind.NUMBER_WATCH, status=None if everything else CaseStatus.OPEN)
        cases, _ = await asyncio.to_thread(self.parts.cases.list_cases, where, limit=200, after=None)
        if not everything:  # open and assigned: the watch list is what is not resolved yet
            assigned, _ = await asyncio.to_thread(
                self.parts.cases.list_cases,
                CaseFilter(kind=CaseKind.NUMBER_WATCH, status=CaseStatus.ASSIGNED),
                limit=200,
                after=None,
            )
            cases = sorted([*cases, *assigned], key=lambda c: c.opened_at)
        return self._render(request, session, "watch.html", {"cases": cases, "everything": everything})

    async def _cases(self, request: Request, session: Session) -> Response:
        status_name = request.query_params.get("status", "open")
        status = None if status_name == "all" else _enum(CaseStatus, status_name, "status")
        kind_name = request.query_params.get("kind", "")
        kind = _enum(CaseKind, kind_name, "kind") if kind_name else None
        after = _cursor(request.query_params.get("after", ""))
        cases, cursor = await asyncio.to_thread(
            self.parts.cases.list_cases, CaseFilter(status=status, kind=kind), limit=PAGE_SIZE, after=after
        )
        return self._render(
            request,
            session,
            "cases.html",
            {"cases": cases, "cursor": cursor, "status": status_name, "kind": kind_name},
        )

    def _case_id(self, request: Request) -> str:
        case_id = str(request.path_params["case_id"])
        if len(case_id) > CASE_ID_LENGTH:
            raise _invalid("case_id", f"must be at most {CASE_ID_LENGTH} characters")
        return case_id

    async def _case(self, request: Request, session: Session) -> Response:
        detail = await asyncio.to_thread(self.parts.cases.get, self._case_id(request))
        return self._render(
            request,
            session,
            "case.html",
            {
                "detail": detail,
                "case": detail.case,
                "resolutions": sorted(RESOLUTIONS[detail.case.kind], key=lambda r: r.value),
                "amount": _amount,
            },
        )

    async def _assign(self, request: Request, session: Session) -> Response:
        case_id = self._case_id(request)
        form = await request.form()
        assignee = _required_text(form, "assignee", ASSIGNEE_MAX, required=False) or session.key_id
        request_id = _required_text(form, "request_id", 64)
        await asyncio.to_thread(
            self.parts.cases.assign,
            case_id,
            assignee,
            request_id=request_id,
            fingerprint=_fingerprint("assign", case_id=case_id, assignee=assignee),
            actor=session.key_id,
            now=_now(),
        )
        session.flashes.append(f"Case {case_id} assigned to {assignee}.")
        return RedirectResponse(f"/cases/{case_id}", status_code=303)

    async def _resolve(self, request: Request, session: Session) -> Response:
        case_id = self._case_id(request)
        form = await request.form()
        resolution = _enum(Resolution, _text(form, "resolution").lower(), "resolution")
        note = _required_text(form, "note", OUTCOME_NOTE_MAX, required=False)
        request_id = _required_text(form, "request_id", 64)
        case, replayed = await asyncio.to_thread(
            self.parts.cases.resolve,
            case_id,
            resolution,
            note,
            request_id=request_id,
            fingerprint=_fingerprint("resolve", case_id=case_id, resolution=resolution.value, note=note),
            actor=session.key_id,
            now=_now(),
            make_number_for=self._make_number,
        )
        session.flashes.append(
            f"Case {case.case_id} resolved: {resolution.value}"
            + (" (already done by this form)." if replayed else ".")
        )
        return RedirectResponse("/cases", status_code=303)

    # -- models -------------------------------------------------------------------------------------------

    async def _models(self, request: Request, session: Session) -> Response:
        after = _cursor(request.query_params.get("after", ""))
        runs, cursor = await asyncio.to_thread(
            self.parts.registry.list_models, scope=ModelScope.GLOBAL, limit=PAGE_SIZE, after_id=after
        )
        summary = await asyncio.to_thread(self._model_summary)
        reports = {run.version for run in runs if self._report_path(run.version, "index.html") is not None}
        return self._render(
            request,
            session,
            "models.html",
            {"runs": runs, "cursor": cursor, "reports": reports, "summary": summary},
        )

    def _report_path(self, version: str, name: str) -> Path | None:
        if not _VERSION.fullmatch(version) or not _REPORT_FILE.fullmatch(name):
            return None
        root = self.parts.reports_dir.resolve()
        path = (root / version / name).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    async def _report(self, request: Request, session: Session) -> Response:
        path = self._report_path(str(request.path_params["version"]), str(request.path_params["name"]))
        if path is None:
            return self._render(
                request, session, "error.html", {"title": "No such report", "message": _NO_REPORT}, 404
            )
        return FileResponse(path, headers={"content-security-policy": REPORT_CSP})

    async def _promote(self, request: Request, session: Session) -> Response:
        form = await request.form()
        version = _required_text(form, "version", MODEL_VERSION_MAX)
        force = _text(form, "force") == "yes"
        if _text(form, "confirm") != "yes":
            return self._render(
                request, session, "confirm.html", {"action": "promote", "version": version, "force": force}
            )
        reason = _required_text(form, "reason", MAX_REASON)
        request_id = _required_text(form, "request_id", 64)
        result = await asyncio.to_thread(
            self.parts.registry.promote,
            ModelScope.GLOBAL,
            "",
            version,
            force=force,
            now=_now(),
            actor=session.key_id,
            reason=reason,
            request_id=request_id,
            fingerprint=_fingerprint("promote", version=version, force=force, reason=reason),
        )
        previous = f" (was {result.previous_version})" if result.previous_version else ""
        session.flashes.append(
            f"Run {result.version} promoted{previous}: {result.customer_models} customer models active."
        )
        return RedirectResponse("/models", status_code=303)

    async def _rollback(self, request: Request, session: Session) -> Response:
        form = await request.form()
        version = _required_text(form, "version", MODEL_VERSION_MAX, required=False)
        if _text(form, "confirm") != "yes":
            return self._render(request, session, "confirm.html", {"action": "rollback", "version": version})
        reason = _required_text(form, "reason", MAX_REASON)
        request_id = _required_text(form, "request_id", 64)
        result = await asyncio.to_thread(
            self.parts.registry.rollback,
            ModelScope.GLOBAL,
            "",
            version=version,
            now=_now(),
            actor=session.key_id,
            reason=reason,
            request_id=request_id,
            fingerprint=_fingerprint("rollback", version=version, reason=reason),
        )
        active = f"; {result.model.version} is active again" if result.model is not None else ""
        session.flashes.append(f"Run {result.rolled_back_version} rolled back{active}.")
        return RedirectResponse("/models", status_code=303)

    # -- lists and rules ----------------------------------------------------------------------------------

    async def _policy(self, request: Request, session: Session) -> Response:
        lists = await asyncio.to_thread(self.parts.policy.list_lists, _now())
        return self._render(request, session, "policy.html", {"lists": lists, "kinds": list(ListKind)})

    async def _list(self, request: Request, session: Session) -> Response:
        name = _path_name(request, "list_name", LIST_NAME_PATTERN, "a list")
        everything = request.query_params.get("expired") == "1"
        after = _cursor(request.query_params.get("after", ""))
        plist = await asyncio.to_thread(self.parts.policy.get_list, name)
        entries, cursor = await asyncio.to_thread(
            self.parts.policy.list_entries,
            name,
            now=_now(),
            include_expired=everything,
            limit=PAGE_SIZE,
            after=after,
        )
        return self._render(
            request,
            session,
            "list.html",
            {"plist": plist, "entries": entries, "cursor": cursor, "everything": everything, "now": _now()},
        )

    async def _create_list(self, request: Request, session: Session) -> Response:
        form = await request.form()
        name = _required_text(form, "name", 64)
        if not LIST_NAME_PATTERN.fullmatch(name):
            raise _invalid("name", "must be 1 to 64 of a-z 0-9 _ . -, starting with a letter or digit")
        kind = _enum(ListKind, _text(form, "kind"), "kind")
        list_type = _enum(ListType, _text(form, "type"), "type")
        description = _required_text(form, "description", REASON_MAX, required=False)
        request_id = _required_text(form, "request_id", 64)
        created = await asyncio.to_thread(
            self.parts.policy.create_list,
            name,
            kind,
            list_type,
            description,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint(
                "create_list", name=name, kind=kind.value, type=list_type.value, description=description
            ),
        )
        session.flashes.append(f"List {created.name} created ({created.type.value}, {created.kind.value}).")
        return RedirectResponse(f"/policy/lists/{created.name}", status_code=303)

    async def _add_entry(self, request: Request, session: Session) -> Response:
        name = _path_name(request, "list_name", LIST_NAME_PATTERN, "a list")
        form = await request.form()
        value = _required_text(form, "value", VALUE_MAX)
        reason = _required_text(form, "reason", REASON_MAX)
        expires_at = _expiry(_text(form, "expires_at"))
        request_id = _required_text(form, "request_id", 64)
        plist = await asyncio.to_thread(self.parts.policy.get_list, name)
        value = normalize_value(plist.kind, value)
        entry = await asyncio.to_thread(
            self.parts.policy.add_entry,
            name,
            value,
            reason=reason,
            expires_at=expires_at,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint(
                "add_entry", list=name, value=value, reason=reason, expires_at=expires_at
            ),
        )
        session.flashes.append(f"{entry.value} is on list {name}.")
        return RedirectResponse(f"/policy/lists/{name}", status_code=303)

    async def _remove_entry(self, request: Request, session: Session) -> Response:
        name = _path_name(request, "list_name", LIST_NAME_PATTERN, "a list")
        form = await request.form()
        value = _required_text(form, "value", VALUE_MAX)
        reason = _required_text(form, "reason", REASON_MAX)
        request_id = _required_text(form, "request_id", 64)
        plist = await asyncio.to_thread(self.parts.policy.get_list, name)
        value = normalize_value(plist.kind, value)
        removed = await asyncio.to_thread(
            self.parts.policy.remove_entry,
            name,
            value,
            reason=reason,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint("remove_entry", list=name, value=value, reason=reason),
        )
        session.flashes.append(
            f"{value} removed from list {name}." if removed else f"{value} was not on list {name}."
        )
        return RedirectResponse(f"/policy/lists/{name}", status_code=303)

    async def _rules(self, request: Request, session: Session) -> Response:
        return await self._rules_page(request, session, {}, None)

    async def _rules_page(
        self,
        request: Request,
        session: Session,
        draft: Mapping[str, str],
        problem: RuleSyntaxError | None,
        status: int = 200,
    ) -> Response:
        rules = await asyncio.to_thread(self.parts.policy.list_rules, name="", status=None)
        return self._render(
            request,
            session,
            "rules.html",
            {
                "rules": rules,
                "actions": list(RuleAction),
                "draft": draft,
                "problem": problem,
                "problem_line": _problem_line(draft.get("condition", ""), problem),
            },
            status,
        )

    async def _create_rule(self, request: Request, session: Session) -> Response:
        form = await request.form()
        name, condition, action = _rule_fields(form)
        reason = _required_text(form, "reason", REASON_MAX)
        request_id = _required_text(form, "request_id", 64)
        try:
            compile_condition(condition)
        except RuleSyntaxError as error:
            # Shown back with its position; nothing is stored (as CreateRule refuses it).
            draft = {"name": name, "condition": condition, "action": action.value, "reason": reason}
            return await self._rules_page(request, session, draft, error, 400)
        rule = await asyncio.to_thread(
            self.parts.policy.create_rule,
            name,
            condition,
            action,
            reason,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint(
                "create_rule", name=name, condition=condition, then=action.value, reason=reason
            ),
        )
        session.flashes.append(f"Rule {rule.name} version {rule.version} saved as a draft.")
        return RedirectResponse("/policy/rules", status_code=303)

    async def _activate(self, request: Request, session: Session) -> Response:
        name = _path_name(request, "rule", NAME_PATTERN, "a rule")
        form = await request.form()
        version = _version(_text(form, "version"))
        if _text(form, "confirm") != "yes":
            rule = await asyncio.to_thread(self.parts.policy.get_rule, name, version)
            active = await asyncio.to_thread(
                self.parts.policy.list_rules, name=name, status=RuleStatus.ACTIVE
            )
            return self._render(
                request,
                session,
                "rule_confirm.html",
                {"action": "activate", "rule": rule, "active": active[0] if active else None},
            )
        reason = _required_text(form, "reason", REASON_MAX)
        request_id = _required_text(form, "request_id", 64)
        rule, retired = await asyncio.to_thread(
            self.parts.policy.activate_rule,
            name,
            version,
            reason=reason,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint("activate_rule", name=name, version=version, reason=reason),
        )
        log.info("rule %s version %d activated by %s", rule.name, rule.version, session.key_id)
        was = f" (version {retired} retired)" if retired else ""
        session.flashes.append(f"Rule {rule.name} version {rule.version} is active{was}.")
        return RedirectResponse("/policy/rules", status_code=303)

    async def _retire(self, request: Request, session: Session) -> Response:
        name = _path_name(request, "rule", NAME_PATTERN, "a rule")
        form = await request.form()
        if _text(form, "confirm") != "yes":
            active = await asyncio.to_thread(
                self.parts.policy.list_rules, name=name, status=RuleStatus.ACTIVE
            )
            if not active:
                raise _invalid("name", "has no active version")
            return self._render(
                request, session, "rule_confirm.html", {"action": "retire", "rule": active[0], "active": None}
            )
        reason = _required_text(form, "reason", REASON_MAX)
        request_id = _required_text(form, "request_id", 64)
        rule = await asyncio.to_thread(
            self.parts.policy.retire_rule,
            name,
            reason=reason,
            actor=session.key_id,
            now=_now(),
            request_id=request_id,
            fingerprint=_fingerprint("retire_rule", name=name, reason=reason),
        )
        log.info("rule %s version %d retired by %s", rule.name, rule.version, session.key_id)
        session.flashes.append(f"Rule {rule.name} version {rule.version} retired.")
        return RedirectResponse("/policy/rules", status_code=303)

    async def _backtest_page(self, request: Request, session: Session) -> Response:
        params = request.query_params
        today = _now().date()
        query = {
            "rule": params.get("rule", "")[:64],
            "version": params.get("version", "")[:18],
            "since": (today - timedelta(days=30)).isoformat(),
            "until": today.isoformat(),
        }
        return self._render(
            request, session, "backtest.html", {"query": query, "report": None, "actions": list(RuleAction)}
        )

    async def _backtest(self, request: Request, session: Session) -> Response:
        form = await request.form()
        since = _day(_text(form, "since"), "since")
        until = _day(_text(form, "until"), "until")
        if until < since:
            raise _invalid("until", "must not be before since")
        if (until - since).days + 1 > MAX_BACKTEST_DAYS:
            raise _invalid("until", f"must be at most {MAX_BACKTEST_DAYS} days after since")
        condition = _text(form, "condition")
        query = {k: _text(form, k) for k in ("rule", "version", "condition", "action", "since", "until")}
        now = _now()
        if condition:  # a condition not saved yet, as BacktestRules' ``conditions``
            name, condition, action = _rule_fields(form, name_field="rule")
            try:
                compile_condition(condition)
            except RuleSyntaxError as error:
                raise _invalid("condition", str(error)) from None
            candidate = Rule(name, 0, condition, action, name, RuleStatus.DRAFT, now, "")
            rule: Rule | None = candidate
        else:
            rule = None
            name = _required_text(form, "rule", 64)
            version = _version(_text(form, "version"))

        def run() -> tuple[Rule, Any]:
            chosen = rule if rule is not None else self.parts.policy.get_rule(name, version)
            start = datetime.combine(since, time(), UTC)
            end = datetime.combine(until + timedelta(days=1), time(), UTC)
            return chosen, self.parts.backtests.run([chosen], [], since=start, until=end, now=now)

        chosen, report = await asyncio.to_thread(run)
        return self._render(
            request,
            session,
            "backtest.html",
            {"query": query, "report": report, "rule": chosen, "actions": list(RuleAction)},
        )

    # -- audit --------------------------------------------------------------------------------------------

    async def _audit(self, request: Request, session: Session) -> Response:
        return await self._audit_page(request, session, None)

    async def _verify(self, request: Request, session: Session) -> Response:
        report = await asyncio.to_thread(self.parts.audit.verify, 0)
        if not report.intact:
            log.warning(
                "audit log verification found a break at event %d (%s)",
                report.first_bad_sequence,
                report.problem.value,
            )
        return await self._audit_page(request, session, report)

    async def _audit_page(self, request: Request, session: Session, report: Any) -> Response:
        params = request.query_params
        filters = {name: params.get(name, "").strip() for name in ("action", "actor", "subject")}
        for name, value in filters.items():
            if len(value) > 200:
                raise _invalid(name, "must be at most 200 characters")
        after = _cursor(params.get("after", ""))
        events, cursor = await asyncio.to_thread(
            self.parts.audit.list,
            action=filters["action"] or None,
            actor=filters["actor"] or None,
            subject=filters["subject"] or None,
            limit=PAGE_SIZE,
            after=after,
        )
        return self._render(
            request,
            session,
            "audit.html",
            {
                "events": events,
                "cursor": cursor,
                "filters": filters,
                "report": report,
                "details": _details,
                "can_verify": permitted(session.roles, access.VERIFY_AUDIT),
            },
        )


TRANSITION_RPCS: dict[Transition, str] = {
    Transition.SUSPEND: access.SUSPEND,
    Transition.REACTIVATE: access.REACTIVATE,
    Transition.REVOKE: access.REVOKE,
    Transition.ROTATE: access.ROTATE,
}
_DENIED = "Your key's role may not use this page or action (the same rule as for its RPC)."
_CSRF = "The form was not sent from this console, or it is too old: reload the page and send it again."
_NO_REPORT = "This run has no report. Write one with `posguard-server report --version VERSION`."


def _shown(number: str, roles: frozenset[Role]) -> str:
    """A number as this key may see it: in full to admins, masked as the logs are to everyone else."""
    if not number:
        return ""
    return number if Role.ADMIN in roles else mask(number)


def _enum(kind: Any, value: str, field: str) -> Any:
    try:
        return kind(value.lower())
    except ValueError:
        raise _invalid(field, "is not one of " + ", ".join(m.value for m in kind)) from None


def _rule_fields(form: FormData, name_field: str = "name") -> tuple[str, str, RuleAction]:
    """A rule's name, condition and action from a form, checked as CreateRule checks them."""
    name = _required_text(form, name_field, 64)
    if not NAME_PATTERN.fullmatch(name):
        raise _invalid(name_field, "must be 1 to 64 of A-Z 0-9 _, starting with a letter")
    value = form.get("condition", "")
    condition = value if isinstance(value, str) else ""
    if len(condition) > MAX_EXPRESSION_LENGTH:
        raise _invalid("condition", f"must be at most {MAX_EXPRESSION_LENGTH} characters")
    try:
        action = RuleAction(_text(form, "action").upper())
    except ValueError:
        raise _invalid("action", "must be DECLINE, REVIEW or REASON") from None
    return name, condition, action


def _problem_line(condition: str, problem: RuleSyntaxError | None) -> tuple[str, int] | None:
    """The condition's line at fault and the 0-based column under which to show the caret."""
    if problem is None:
        return None
    lines = condition.splitlines() or [""]
    line = lines[min(max(problem.line, 1), len(lines)) - 1]
    return line, max(problem.column - 1, 0)


def _version(value: str) -> int:
    """A rule version from a form: 0 (or empty) names the newest."""
    if not value:
        return 0
    if not value.isdigit() or len(value) > 9:
        raise _invalid("version", "must be a version number")
    return int(value)


def _day(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _invalid(field, "must be a day (YYYY-MM-DD)") from None


def _expiry(value: str) -> datetime | None:
    """An entry's expiry from a ``datetime-local`` field, read as UTC; None when empty."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _invalid("expires_at", "must be a date and time (YYYY-MM-DDTHH:MM)") from None
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment <= _now():
        raise _invalid("expires_at", "must be in the future")
    return moment


def _cursor(value: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or len(value) > 18:
        raise _invalid("after", "must be a page cursor from a link of this page")
    return int(value)


def _major(amount_minor: int, currency: str) -> float:
    exponent = minor_exponent(currency)
    return float(amount_minor) / float(10 ** (exponent if exponent is not None else 2))


def _amount(amount_minor: int, currency: str) -> str:
    exponent = minor_exponent(currency)
    digits = exponent if exponent is not None else 2
    return f"{amount_minor / 10**digits:,.{digits}f} {currency}"


def _flagged(decision: Decision | None) -> bool:
    return decision in (Decision.REVIEW, Decision.DECLINE)


def _details(event: AuditEvent) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(event.details.items()))


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
