"""The service's settings: one definition, read from ``POSGUARD_*`` variables and matching CLI flags.

Each field of :class:`Settings` is an environment variable (``listen`` → ``POSGUARD_LISTEN``) and a flag of
``posguard-server`` (``--listen``); a flag wins over the variable, the variable over the default.
"""

from __future__ import annotations

import logging
import zoneinfo
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from posguard_server.logs import LOG_FORMATS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EVENT_LOOPS = ("uvloop", "asyncio")
NO_MODEL_DECISIONS = ("review", "decline", "approve")


class Settings(BaseSettings):
    """Everything an operator can set. Field descriptions double as ``--help`` text."""

    model_config = SettingsConfigDict(env_prefix="POSGUARD_", extra="forbid", frozen=True)

    listen: Annotated[str, Field(description="gRPC listen address, host:port (port 0 picks a free one).")] = (
        "127.0.0.1:50051"
    )
    data_dir: Annotated[
        Path, Field(description="Directory for the embedded database, keys and model artifacts.")
    ] = Path("var")
    database_url: Annotated[
        str | None,
        Field(description="SQLAlchemy URL; default: a SQLite file posguard.db in the data directory."),
    ] = None
    postgres_writers: Annotated[
        int,
        Field(
            ge=1,
            le=16,
            description="Threads per process writing the gateway calls' batches to PostgreSQL, each one "
            "transaction at a time (SQLite has one writer). More overlap the round trips to a distant "
            "database, at the cost of smaller batches and more waiting for the interpreter lock.",
        ),
    ] = 1
    metrics_enabled: Annotated[bool, Field(description="Serve Prometheus metrics over HTTP.")] = True
    metrics_host: Annotated[str, Field(description="Address the metrics endpoint listens on.")] = "127.0.0.1"
    metrics_port: Annotated[
        int, Field(ge=0, le=65535, description="Port of the metrics endpoint (0 picks a free one).")
    ] = 9464
    tls_cert_file: Annotated[
        Path | None, Field(description="PEM server certificate chain; enables TLS with tls_key_file.")
    ] = None
    tls_key_file: Annotated[Path | None, Field(description="PEM private key of the server certificate.")] = (
        None
    )
    tls_client_ca_file: Annotated[
        Path | None,
        Field(description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."),
    ] = None
    issuers_file: Annotated[
        Path | None,
        Field(description="JSON list of issuer schemes (country, region, institution, ...); default: one."),
    ] = None
    default_issuer: Annotated[str, Field(description="Issuer of numbers whose request names none.")] = (
        "default"
    )
    number_keys: Annotated[
        SecretStr | None,
        Field(
            description="Number key ring as JSON (from a secret store); default: data_dir/number_keys.json."
        ),
    ] = None
    log_level: Annotated[str, Field(description="DEBUG, INFO, WARNING or ERROR.")] = "INFO"
    log_format: Annotated[
        str, Field(description="json (one object per line, for log collectors) or text (for people).")
    ] = "json"
    grace_period: Annotated[
        float, Field(gt=0, description="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
    ] = 10.0
    workers: Annotated[
        int,
        Field(
            ge=1,
            le=64,
            description="Server processes sharing the listen port (SO_REUSEPORT); each has its own "
            "database pool, caches and max_concurrent_rpcs, and worker i serves metrics on metrics_port + i.",
        ),
    ] = 1
    event_loop: Annotated[
        str,
        Field(
            description="uvloop (libuv's event loop: less CPU per call) or asyncio (the standard library's)."
        ),
    ] = "uvloop"
    max_concurrent_rpcs: Annotated[
        int,
        Field(
            gt=0,
            description="Gateway calls (scoring, verification, codes, customer look-ups) in progress per "
            "process beyond which new ones get RESOURCE_EXHAUSTED at once; a stream counts only while "
            "transactions of it are being scored. Size it as calls per second × latency budget.",
        ),
    ] = 16
    max_concurrent_admin_rpcs: Annotated[
        int,
        Field(
            gt=0,
            description="Administrative calls (the Admin service, listing customers, lifecycle changes) in "
            "progress per process beyond which new ones get RESOURCE_EXHAUSTED at once; counted apart from "
            "max_concurrent_rpcs, so neither kind can take the other's share.",
        ),
    ] = 2
    max_concurrent_auth_lookups: Annotated[
        int,
        Field(
            gt=0,
            description="Database reads of API key ids this process has no key for (callers choose key "
            "ids), at once, on threads of their own; beyond it such calls get RESOURCE_EXHAUSTED at once. "
            "Keys already in use are re-read apart from it.",
        ),
    ] = 2
    stream_idle_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="A ScoreTransactions stream that sends no request for this long while none of its "
            "transactions is being scored is ended with DEADLINE_EXCEEDED (reason STREAM_IDLE); 0: never.",
        ),
    ] = 60.0
    keepalive_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="How often the server pings a connection that has sent nothing; one that does not "
            "answer within keepalive_timeout_seconds is closed, with its calls (0: no pings).",
        ),
    ] = 60.0
    keepalive_timeout_seconds: Annotated[
        float, Field(gt=0, description="How long the server waits for the answer to a keepalive ping.")
    ] = 20.0
    max_connection_idle_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="A connection with no call in progress for this long is closed (GOAWAY; clients "
            "reconnect when they next call); 0: never.",
        ),
    ] = 300.0
    max_connection_age_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="A connection older than this is asked to go away (GOAWAY): new calls use a new "
            "connection, so load spreads over restarted or added servers; 0: never.",
        ),
    ] = 3600.0
    max_connection_age_grace_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="How long the calls of a connection past max_connection_age may still run before "
            "the connection is closed (a stream still open then ends with UNAVAILABLE).",
        ),
    ] = 300.0
    failure_limit: Annotated[
        int,
        Field(
            ge=0,
            description="Calls naming a number, external id, customer id or dynamic code that does not "
            "exist (guesses: verifications, redemptions, lookups, scoring) one API key may make per "
            "failure_window_seconds before its calls that name a customer are refused with "
            "RESOURCE_EXHAUSTED (0: no limit).",
        ),
    ] = 100
    failure_window_seconds: Annotated[
        float,
        Field(gt=0, description="The window failure_limit and code_failure_limit count in, in seconds."),
    ] = 60.0
    code_failure_limit: Annotated[
        int,
        Field(
            ge=0,
            description="Wrong codes presented against one dynamic-code enrolment, summed over all API keys, "
            "per failure_window_seconds before its codes are refused with RESOURCE_EXHAUSTED (0: no limit).",
        ),
    ] = 20
    guess_spike_limit: Annotated[
        int,
        Field(
            ge=0,
            description="Guesses across all API keys within a minute (per process) that count as a spike: a "
            "warning, the posguard_guess_spikes metric and a guessing.spike audit event (0: not watched).",
        ),
    ] = 300
    auth_cache_seconds: Annotated[
        float,
        Field(ge=0, description="How long a verified API key is trusted before the database is asked again."),
    ] = 5.0
    risk_review_threshold: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="risk_score from which a transaction is REVIEW (0.99: about 1% of normal traffic).",
        ),
    ] = 0.99
    risk_decline_threshold: Annotated[
        float,
        Field(
            gt=0,
            le=1,
            description="risk_score from which a transaction is DECLINE (at least the review one).",
        ),
    ] = 0.999
    model_refresh_seconds: Annotated[
        float,
        Field(gt=0, description="How often a server checks the registry for newly promoted models."),
    ] = 5.0
    risk_no_model_decision: Annotated[
        str,
        Field(
            description="The decision (review, decline or approve) for a transaction no model can score: no "
            "model is active yet, or the active global model cannot be loaded and none loaded before it is.",
        ),
    ] = "review"
    cases_on_decline: Annotated[
        bool,
        Field(
            description="Open a review case for every transaction decided DECLINE too (REVIEW always opens "
            "one)."
        ),
    ] = False
    watch_interval_seconds: Annotated[
        float,
        Field(
            ge=0,
            description="How often the number watch looks at how each number was used since it last looked "
            "(0: never).",
        ),
    ] = 60.0
    watch_min_events: Annotated[
        int,
        Field(ge=1, description="Fewest events of one kind in a watch window that can flag a number."),
    ] = 20
    watch_own_ratio: Annotated[
        float,
        Field(
            ge=1,
            description="How many times its own usual use per window a number's use must be to be flagged.",
        ),
    ] = 5.0
    watch_population_ratio: Annotated[
        float,
        Field(
            ge=1,
            description="How many times the median use of the other numbers in the window a number's use "
            "must be to be flagged.",
        ),
    ] = 10.0
    policy_time_zone: Annotated[
        str,
        Field(
            description="The IANA time zone in which rules read a transaction's local hour and weekday "
            "(txn.hour, txn.weekday), e.g. Asia/Shanghai.",
        ),
    ] = "UTC"
    health_probe_seconds: Annotated[
        float,
        Field(
            gt=0,
            description="How often a server that wrote nothing meanwhile writes one row to check that the "
            "database takes writes; while writes fail, health reports the services NOT_SERVING.",
        ),
    ] = 5.0
    console_enabled: Annotated[
        bool, Field(description="Serve the web console (sign-in with an API key) on console_listen.")
    ] = True
    console_listen: Annotated[
        str,
        Field(
            description="Web console listen address, host:port (port 0 picks a free one); HTTPS with the "
            "gRPC port's certificate when TLS is set."
        ),
    ] = "127.0.0.1:8080"
    console_session_seconds: Annotated[
        float,
        Field(
            gt=0,
            description="How long a console sign-in lasts; sessions live in the server process's memory, so "
            "a restart ends them, and a revoked key's sessions end at its next request.",
        ),
    ] = 8 * 3600.0
    reports_dir: Annotated[
        Path | None,
        Field(
            description="Folder of evaluation reports, one folder per training run (VERSION/index.html), "
            "which the console links; default: data_dir/reports."
        ),
    ] = None
    insecure_no_auth: Annotated[
        bool,
        Field(description="Turn authentication off (local development only; refused off loopback)."),
    ] = False

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value.lower() not in LOG_FORMATS:
            raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
        return value.lower()

    @field_validator("event_loop")
    @classmethod
    def _known_loop(cls, value: str) -> str:
        if value.lower() not in EVENT_LOOPS:
            raise ValueError(f"must be one of {', '.join(EVENT_LOOPS)}")
        return value.lower()

    @field_validator("risk_no_model_decision")
    @classmethod
    def _known_decision(cls, value: str) -> str:
        if value.lower() not in NO_MODEL_DECISIONS:
            raise ValueError(f"must be one of {', '.join(NO_MODEL_DECISIONS)}")
        return value.lower()

    @field_validator("policy_time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name such as UTC or Asia/Shanghai") from None
        return value

    @field_validator("listen", "console_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError("must be host:port, e.g. 127.0.0.1:50051 or [::]:50051")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        if self.risk_decline_threshold < self.risk_review_threshold:
            raise ValueError("risk_decline_threshold must not be below risk_review_threshold")
        if self.insecure_no_auth and not self.listens_on_loopback:
            raise ValueError("insecure_no_auth is only allowed when listening on a loopback address")
        return self

    @property
    def embedded_database_file(self) -> Path:
        """Where the embedded SQLite database lives: used when ``database_url`` is not set."""
        return self.data_dir / "posguard.db"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.embedded_database_file.resolve()}"

    @property
    def effective_reports_dir(self) -> Path:
        return self.reports_dir if self.reports_dir is not None else self.data_dir / "reports"

    @property
    def number_key_file(self) -> Path:
        return self.data_dir / "number_keys.json"

    @property
    def listens_on_loopback(self) -> bool:
        host = self.listen.rpartition(":")[0].strip("[]")
        return host in ("localhost", "::1") or host.startswith("127.")

    @property
    def log_level_number(self) -> int:
        return int(logging.getLevelName(self.log_level))
