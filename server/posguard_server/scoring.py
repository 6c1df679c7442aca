"""The risk engine: from a validated transaction to a stored, explained answer.

The scoring service (``services.scoring``) resolves the customer inside the transaction that will store the
answer; the engine loads the active models (picking up promotions without a restart) and scores in two steps
inside that transaction, with the customers locked: each item, in order, computes its features from the
customer's profile and the profile after it (``RiskEngine.item``); then ``RiskEngine.finish`` scores,
explains and decides the whole batch at once. Everything is synchronous: it runs on the database's writer
thread (``api.group_commit``), or on a worker thread for the other RPCs.

When a training run is in shadow, every transaction a model scores is scored by the shadow run too, from the
same features, and the shadow score is stored next to the answer for comparison; the answer is always the
active models'. A shadow model that cannot be loaded is skipped, never a reason to fail a score.

A model that cannot be loaded (its artifact does not match its checksum, or loading fails in any way) never
fails a call either: the global model loaded before it keeps serving, a customer's transactions are scored
by the global model alone. Without any usable global model (none active yet, or the first one this server
loads is unusable) nothing can be scored, not even with an intact customer model, whose score only the
global model calibrates: the answer is the configured ``no_model`` decision, with a reason saying why.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar, cast

import numpy as np
import numpy.typing as npt

from posguard_models.explain import explain
from posguard_models.features import CORE_FEATURES, FEATURES, Event, Profile
from posguard_models.forest import CompiledForest
from posguard_models.model import GlobalModel
from posguard_server.domain.currencies import minor_exponent
from posguard_server.domain.errors import InvalidArgument, PosguardError
from posguard_server.domain.policy import NumberSignals, Policy, PolicyInput
from posguard_server.domain.risk import (
    Channel,
    Decision,
    Evaluation,
    ModelRecord,
    ModelScope,
    NewTransaction,
    Outcome,
    OutcomeRecord,
    ProfileSnapshot,
    StoredReason,
)
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.dynamic_codes import SqlDynamicCodeStore
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.policy import SqlPolicyStore
from posguard_server.store.profiles import SqlProfileStore
from posguard_server.store.scoring_writes import PlaceActivity, Scored, ScoreItem, SqlScoringStore
from posguard_server.store.shadow import SqlShadowStore

log = logging.getLogger(__name__)

CUSTOMER_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class TransactionInput:
    """A validated transaction, before the customer is resolved."""

    transaction_id: str
    amount_minor: int
    currency: str
    merchant_id: str
    terminal_id: str
    mcc: str
    event_time: datetime
    channel: str
    latitude: float | None
    longitude: float | None


@dataclass(frozen=True, slots=True)
class IdentityDecline:
    """The customer is known, but the identifier presented must decline the payment (no model is asked)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """A validated transaction with its resolved customer, ready to score."""

    txn: TransactionInput
    customer_id: str
    identity: IdentityDecline | None  # set: decline for this reason without asking a model
    request_id: str  # "" for none
    fingerprint: str
    caller: str = ""  # whose request_id it is (the caller's key id)
    # What lists and rules read beyond the transaction (see ``PolicyFacts``); None without a policy.
    policy: PolicyFacts | None = None


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """What the scoring unit read for lists and rules: whom the call named, and, when an active rule reads
    them, whether the merchant and terminal are new to the customer and what the numbers say."""

    numbers: tuple[str, ...] = ()  # the number presented and the customer's primary number
    external_id: str = ""  # "namespace:value" when the call named the customer by one
    new_merchant: bool | None = None
    new_terminal: bool | None = None
    signals: NumberSignals | None = None


@dataclass(frozen=True, slots=True)
class Thresholds:
    review: float
    decline: float

    def decide(self, risk_score: float) -> Decision:
        if risk_score >= self.decline:
            return Decision.DECLINE
        if risk_score >= self.review:
            return Decision.REVIEW
        return Decision.APPROVE


@dataclass(frozen=True, slots=True)
class RiskProfileView:
    customer_id: str
    transaction_count: int
    first_seen: datetime | None
    last_seen: datetime | None
    typical_amount_minor: int | None
    currency: str
    active_scope: str
    active_version: str
    history_size: int
    cold_start: bool
    failed_verifications: int
    dynamic_code_replays: int
    declines: int
    reviews: int
    distinct_merchants: int
    distinct_terminals: int


@dataclass(frozen=True, slots=True)
class ActiveGlobal:
    version: str
    model: GlobalModel


@dataclass(frozen=True, slots=True)
class CustomerForest:
    version: str
    forest: CompiledForest
    sample_count: int


@dataclass(frozen=True, slots=True)
class ShadowRun:
    """The training run in shadow: its version, and the global model it scores with.

    That is the run's own GLOBAL model, or the active one when the run retrained customer models only.
    """

    version: str
    model: GlobalModel


class Unreadable(enum.Enum):
    """A shadow customer model this server cannot load: that customer's transactions get no shadow score."""

    MODEL = "unreadable"


# The active global model and the shadow run of one registry generation.
Serving = tuple[ActiveGlobal | None, ShadowRun | None]

# A customer's model in the shadow run; None when the run has none for them (their active one stands in).
ShadowCustomer = CustomerForest | None | Unreadable


@dataclass(frozen=True, slots=True)
class ShadowPick:
    """What scores one transaction in shadow: the run, and the customer forest (None: the global alone)."""

    run: ShadowRun
    own: CustomerForest | None


@dataclass(slots=True)
class Prepared:
    """One transaction between the two steps of scoring a batch (see ``RiskEngine.item`` and ``finish``).

    First, in order, each transaction's features against its customer's profile and the profile after it
    (the next transaction of that customer in the batch starts from there). Then ``finish`` scores the batch
    at once and sets ``evaluation``; it is set from the start when nothing is left to score (an identity
    decline, no active model).
    """

    new_state: bytes | None
    x: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    profile: Profile = field(default_factory=Profile)  # before this transaction, for the explanation
    event: Event = field(default_factory=lambda: Event(0.0, 0.0))
    currency: str = ""
    active: ActiveGlobal | None = None
    own: CustomerForest | None = None
    terminal: tuple[int, int] | None = None
    shadow_version: str = ""
    shadow_risk_score: float | None = None
    evaluation: Evaluation | None = None
    # Set when lists or rules are in force and the transaction is not an identity decline.
    policy: Policy | None = None
    policy_input: PolicyInput | None = None

    @property
    def counts_in_history(self) -> bool:
        return self.evaluation.counts_in_history if self.evaluation is not None else True

    @classmethod
    def decided(cls, evaluation: Evaluation) -> Prepared:
        return cls(new_state=evaluation.new_state, evaluation=evaluation)


def _as_prepared(item: object) -> Prepared:
    if not isinstance(item, Prepared):
        raise TypeError(f"finish takes what the engine's items prepared, not {type(item).__name__}")
    return item


# The reasons of an answer no model scored (its decision is the configured no-model decision).
NO_MODEL = StoredReason("NO_MODEL", "no risk model is active yet: the transaction was not scored", 0.0)
NO_USABLE_MODEL = StoredReason(
    "NO_USABLE_MODEL",
    "the active risk model cannot be loaded and no earlier one is loaded: no usable model, the transaction "
    "was not scored",
    0.0,
)


class ModelEvents(Protocol):
    """What the model cache tells the rest of the server (health and metrics); called from any thread."""

    def model_load_failed(self, kind: str) -> None:
        """A model of ``kind`` ("global", "customer" or "shadow") could not be loaded."""

    def risk_model_usable(self, usable: bool) -> None:
        """Whether a global model is loaded while one is active (False: answers are the no-model decision)."""


class _NoEvents:
    def model_load_failed(self, kind: str) -> None:
        pass

    def risk_model_usable(self, usable: bool) -> None:
        pass


_Model = TypeVar("_Model")
# A cached customer model and the registry generation it was loaded under (None: before the first read).
_Entry = tuple[int | None, _Model]


class ModelCache:
    """The active models and the shadow run, reloaded when the registry's generation changes.

    The generation is read at most every ``refresh_seconds`` (one indexed single-row read), so a promotion
    reaches every server within that time and no server reads the registry per request. Customer models are
    loaded lazily on a customer's first transaction and kept in a bounded LRU; a customer without a model is
    cached too, so cold-start customers cost no read after the first. The shadow run's customer models are
    cached the same way, in an LRU of their own, and only while a run is in shadow.
    """

    def __init__(
        self,
        registry: SqlModelRegistry,
        shadow: SqlShadowStore,
        *,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = CUSTOMER_CACHE_SIZE,
        events: ModelEvents | None = None,
    ) -> None:
        self._registry = registry
        self._shadow = shadow
        self._refresh = refresh_seconds
        self._clock = clock
        self._capacity = capacity
        self._events: ModelEvents = events if events is not None else _NoEvents()
        # The active global model's version when it could not be loaded (None: loaded, or none active).
        self._unloadable: str | None = None
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._checked = -float("inf")
        self._global: ActiveGlobal | None = None
        self._customers: OrderedDict[str, _Entry[CustomerForest | None]] = OrderedDict()
        # Replaced as a whole, so a reader never sees the active model of one generation and the shadow run
        # of another.
        self._serving: tuple[ActiveGlobal | None, ShadowRun | None] = (None, None)
        self._shadow_customers: OrderedDict[str, _Entry[ShadowCustomer]] = OrderedDict()

    def current(self) -> ActiveGlobal | None:
        return self.serving()[0]

    def no_model_reason(self) -> StoredReason:
        """Why no global model serves: none is active yet, or the active one could not be loaded."""
        return NO_USABLE_MODEL if self._unloadable is not None else NO_MODEL

    def serving(self) -> tuple[ActiveGlobal | None, ShadowRun | None]:
        """The active global model and the shadow run (None when none is in shadow), of one generation."""
        now = self._clock()
        if now - self._checked < self._refresh:
            return self._serving
        with self._lock:
            if now - self._checked < self._refresh:  # another thread refreshed while this one waited
                return self._serving
            # Read under the lock: a generation read before another thread's reload must not undo it.
            generation = self._registry.generation()
            self._checked = now
            if generation != self._generation:
                self._global = self._load_global()
                self._serving = (self._global, self._load_shadow(self._global))
                self._customers.clear()
                self._shadow_customers.clear()
                self._generation = generation
            elif self._unloadable is not None:
                # The active global model failed to load: try again every refresh, the failure may have
                # passed (memory, a read cut short). The shadow run and the customers' models stay.
                self._global = self._load_global()
                self._serving = (self._global, self._serving[1])
            return self._serving

    def _load_global(self) -> ActiveGlobal | None:
        # A failing read raises (the call is UNAVAILABLE, the next one reads again); only loading is caught.
        record = self._registry.active_model(ModelScope.GLOBAL, "")
        if record is None:
            loaded, self._unloadable = None, None
        else:
            try:
                loaded = ActiveGlobal(record.version, _global_model(record))
                self._unloadable = None
            except Exception:
                # Caught broadly on purpose: a damaged artifact makes the parsers raise almost anything (zlib,
                # zipfile, tokenizer errors, NotImplementedError for an unknown compression), and none of it
                # may fail a call or leave the server without the model it had. Keep serving that one.
                if record.version != self._unloadable:  # logged once per version, not at every retry
                    log.exception(
                        "active global model %s cannot be loaded; %s",
                        record.version,
                        f"keeping model {self._global.version}" if self._global else "no usable model",
                    )
                self._events.model_load_failed("global")
                loaded, self._unloadable = self._global, record.version
        self._events.risk_model_usable(loaded is not None or self._unloadable is None)
        return loaded

    def _load_shadow(self, active: ActiveGlobal | None) -> ShadowRun | None:
        version = self._shadow.shadow_version()
        if version is None:
            return None
        record = self._shadow.shadow_model(ModelScope.GLOBAL, "")
        if record is None or record.artifact is None:
            # A run that retrained customer models only: they combine with the active global model.
            if active is None:
                log.warning("shadow run %s has no global model and none is active: not scoring it", version)
                return None
            return ShadowRun(version, active.model)
        try:
            return ShadowRun(record.version, _global_model(record))
        except Exception:  # broadly, as for the active model: a shadow model never fails a call
            log.exception(
                "shadow global model %s cannot be loaded; not scoring the shadow run", record.version
            )
            self._events.model_load_failed("shadow")
            return None

    def customer(self, customer_id: str) -> CustomerForest | None:
        return self._cached(
            self._customers,
            customer_id,
            lambda: self._customer_forest(self._registry.active_model(ModelScope.CUSTOMER, customer_id)),
        )

    def shadow_customer(self, customer_id: str) -> ShadowCustomer:
        """The customer's model in the shadow run (read while a run is in shadow, see ``serving``)."""
        return self._cached(
            self._shadow_customers,
            customer_id,
            lambda: self._shadow_forest(self._shadow.shadow_model(ModelScope.CUSTOMER, customer_id)),
        )

    def _customer_forest(self, record: ModelRecord | None) -> CustomerForest | None:
        if record is None:
            return None
        try:
            return CustomerForest(record.version, _forest(record), record.sample_count)
        except Exception:  # broadly, as for the global model (see _load_global)
            log.exception("customer model %s cannot be loaded; scoring with the global model", record.version)
            self._events.model_load_failed("customer")
            return None

    def _shadow_forest(self, record: ModelRecord | None) -> ShadowCustomer:
        if record is None:
            return None
        try:
            return CustomerForest(record.version, _forest(record), record.sample_count)
        except Exception:  # broadly, as for the global model (see _load_global)
            log.exception("shadow customer model %s cannot be loaded; no shadow score for it", record.version)
            self._events.model_load_failed("shadow")
            return Unreadable.MODEL

    def _cached(
        self, cache: OrderedDict[str, _Entry[_Model]], customer_id: str, load: Callable[[], _Model]
    ) -> _Model:
        """The customer's model from ``cache``, loaded on a miss; each entry carries its generation.

        The read runs outside the lock, so a promotion can clear the cache while it runs: what it read may
        then be the model just replaced. It still answers the call that asked (whose models are of that
        generation), but is kept only if the generation is unchanged, and an entry of another generation
        is never served.
        """
        with self._lock:
            generation = self._generation
            entry = cache.get(customer_id)
            if entry is not None and entry[0] == generation:
                cache.move_to_end(customer_id)
                return entry[1]
        loaded = load()
        with self._lock:
            if self._generation == generation:
                cache[customer_id] = (generation, loaded)
                cache.move_to_end(customer_id)
                while len(cache) > self._capacity:
                    cache.popitem(last=False)
        return loaded


class PolicyCache:
    """The lists and active rules in force, compiled, reloaded when the policy's generation changes.

    As ``ModelCache`` does for models: the generation (one single-row read) is compared at most every
    ``refresh_seconds``, so a change reaches every server within that time and no call reads the lists.
    Rules are compiled once per load. An entry's expiry is checked at match time, so an expired entry stops
    matching at once, without waiting for a change. A rule that no longer compiles (it named a variable a
    later version removed) is left out and logged; the other rules and the lists still apply.
    """

    def __init__(
        self,
        store: SqlPolicyStore,
        *,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._refresh = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = -float("inf")
        self._policy = Policy(generation=-1)

    def current(self) -> Policy:
        now = self._clock()
        if now - self._checked < self._refresh:
            return self._policy
        with self._lock:
            if now - self._checked < self._refresh:
                return self._policy
            generation = self._store.generation()
            self._checked = now
            if generation != self._policy.generation:
                self._policy = self._load()
            return self._policy

    def _load(self) -> Policy:
        state = self._store.state(datetime.now(UTC))
        rules = []
        for rule in state.rules:
            try:
                Policy.build(0, (), (), (rule,))
            except ValueError:
                log.error(
                    "active rule %s version %d does not compile; it is not applied", rule.name, rule.version
                )
                continue
            rules.append(rule)
        return Policy.build(state.generation, state.lists, state.entries, rules)


def _global_model(record: ModelRecord) -> GlobalModel:
    """Load a global model whose artifact matches its checksum, and score once with it before it serves."""
    model = GlobalModel.from_bytes(record.verified_artifact())
    # What scoring and explaining touch, once: a model that loads but cannot score is refused here, not
    # on every call.
    x = np.zeros(len(FEATURES))
    model.score(x, None, 0)
    model.rarity(x)
    return model


def _forest(record: ModelRecord) -> CompiledForest:
    """Load a customer forest whose artifact matches its checksum and that scores this server's features."""
    forest = CompiledForest.from_bytes(record.verified_artifact())
    if forest.n_features != len(CORE_FEATURES):
        # Checked here, not left to fail while scoring: a model that cannot be used must never fail a score.
        raise ValueError(f"the forest takes {forest.n_features} features, not {len(CORE_FEATURES)}")
    forest.score_one(np.zeros(len(CORE_FEATURES)))
    return forest


def major_amount(amount_minor: int, currency: str) -> float:
    exponent = minor_exponent(currency)
    if exponent is None:
        raise InvalidArgument.field("transaction.amount.currency", "is not a known ISO 4217 currency")
    return amount_minor / float(10**exponent)


class RiskEngine:
    def __init__(
        self,
        models: ModelCache,
        writes: SqlScoringStore,
        outcomes: SqlOutcomeStore,
        profiles: SqlProfileStore,
        customers: SqlCustomerStore,
        dynamic: SqlDynamicCodeStore,
        *,
        thresholds: Thresholds,
        no_model_decision: Decision = Decision.REVIEW,
        policy: PolicyCache | None = None,
        time_zone: str = "UTC",
    ) -> None:
        self.models = models
        self.policy = policy
        self._zone = zoneinfo.ZoneInfo(time_zone)
        self._no_model_decision = no_model_decision
        self._writes = writes
        self._outcomes = outcomes
        self._profiles = profiles
        self._customers = customers
        self._dynamic = dynamic
        self._thresholds = thresholds

    # -- scoring --------------------------------------------------------------------------------------

    def score_many(self, requests: Sequence[ScoreRequest]) -> list[Scored | PosguardError]:
        """Score, store and explain each request, in order, in one database transaction.

        One ``(stored, replayed)`` per request, or the error of a request that was refused.
        """
        serving = self.models.serving()
        results: list[Scored | PosguardError | None] = [None] * len(requests)
        items: list[ScoreItem] = []
        slots: list[int] = []
        for slot, request in enumerate(requests):
            try:
                items.append(self.item(request, serving))
            except PosguardError as error:
                results[slot] = error
            else:
                slots.append(slot)
        stored = self._writes.score_many(items, finish=self.finish, now=datetime.now(UTC))
        for slot, result in zip(slots, stored, strict=True):
            results[slot] = result
        return [result for result in results if result is not None]

    def item(self, request: ScoreRequest, serving: Serving) -> ScoreItem:
        """What the store runs to score ``request`` with ``serving``, the models of one generation."""
        active, shadow = serving
        txn, identity = request.txn, request.identity
        policy = self.policy.current() if self.policy is not None and identity is None else None
        if policy is not None and policy.empty:
            policy = None
        event = Event.of(
            txn.event_time.timestamp(),
            major_amount(txn.amount_minor, txn.currency),
            txn.terminal_id,
            txn.merchant_id,
            txn.latitude,
            txn.longitude,
        )
        model = active if identity is None else None
        own = self.models.customer(request.customer_id) if model is not None else None
        place_since = None
        if model is not None and model.model.feedback is not None:
            place_since = txn.event_time - timedelta(days=model.model.feedback.window_days)
        # Without a shadow run this check is all the shadow costs; rule declines store no shadow score.
        pick = None
        if shadow is not None and identity is None:
            pick = self._shadow_pick(shadow, request.customer_id, own, model)
        shadow_place_since = None
        if pick is not None and pick.run.model.feedback is not None:
            since = txn.event_time - timedelta(days=pick.run.model.feedback.window_days)
            # Each training run picks its own feedback window: read the place again only when they differ.
            shadow_place_since = since if since != place_since else None
        record = NewTransaction(
            transaction_id=txn.transaction_id,
            customer_id=request.customer_id,
            event_time=txn.event_time,
            amount_minor=txn.amount_minor,
            currency=txn.currency,
            merchant_id=txn.merchant_id,
            terminal_id=txn.terminal_id,
            mcc=txn.mcc,
            channel=_channel(txn.channel),
            latitude=txn.latitude,
            longitude=txn.longitude,
        )

        def prepare(
            snapshot: ProfileSnapshot | None,
            place: PlaceActivity | None,
            /,
            *,
            shadow_place: PlaceActivity | None = None,
        ) -> Prepared:
            profile = Profile.from_bytes(snapshot.state) if snapshot is not None else Profile()
            if identity is not None:
                return Prepared.decided(
                    Evaluation(
                        risk_score=1.0,
                        decision=Decision.DECLINE,
                        reasons=(StoredReason(identity.code, identity.message, 1.0),),
                        model_scope=ModelScope.NONE,
                        model_version="",
                        history_size=profile.count,
                        cold_start=False,
                        features=None,
                        new_state=None,
                        counts_in_history=False,
                    )
                )
            shadow_terminal = shadow_place if shadow_place_since is not None else place
            prepared = self._prepare(profile, event, txn.currency, model, own, place, pick, shadow_terminal)
            if policy is not None:
                prepared.policy = policy
                prepared.policy_input = self._policy_input(request, profile, event)
            return prepared

        return ScoreItem(
            record,
            request.fingerprint,
            request.request_id,
            prepare,
            place_since,
            shadow_place_since,
            caller=request.caller,
        )

    def _policy_input(self, request: ScoreRequest, profile: Profile, event: Event) -> PolicyInput:
        """What lists and rules read of one transaction, before the model's score."""
        txn, facts = request.txn, request.policy or PolicyFacts()
        local = txn.event_time.astimezone(self._zone)
        return PolicyInput(
            customer_id=request.customer_id,
            numbers=facts.numbers,
            external_id=facts.external_id,
            merchant_id=txn.merchant_id,
            terminal_id=txn.terminal_id,
            mcc=txn.mcc,
            currency=txn.currency,
            channel=txn.channel.lower(),
            amount=event.amount,
            amount_minor=txn.amount_minor,
            time=event.time,
            hour=local.hour,
            weekday=local.isoweekday(),
            history=profile.count,
            typical_amount=profile.typical_amount() or 0.0,
            recent=[(at, amount) for at, amount, _ in profile.recent],
            new_merchant=facts.new_merchant,
            new_terminal=facts.new_terminal,
            signals=facts.signals,
        )

    def _shadow_pick(
        self, shadow: ShadowRun, customer_id: str, own: CustomerForest | None, active: ActiveGlobal | None
    ) -> ShadowPick | None:
        mine = self.models.shadow_customer(customer_id)
        if mine is Unreadable.MODEL:
            return None
        if mine is None:
            # The run trained no model for this customer (an incremental run retrains only customers with new
            # history): their active model stands in, so both scores compare like for like.
            mine = own if active is not None else self.models.customer(customer_id)
        return ShadowPick(shadow, mine)

    def _prepare(
        self,
        profile: Profile,
        event: Event,
        currency: str,
        active: ActiveGlobal | None,
        own: CustomerForest | None,
        terminal: tuple[int, int] | None,
        shadow: ShadowPick | None = None,
        shadow_terminal: tuple[int, int] | None = None,
    ) -> Prepared:
        """The features against the profile and the profile after this transaction; scored in ``finish``."""
        x = profile.features(event)
        shadow_version, shadow_risk = "", None
        if shadow is not None:
            # The very call the answer would make with this run active: the same features, the same place's
            # activity (over the run's own feedback window).
            mine = shadow.own
            shadow_score = shadow.run.model.score(
                x, mine.forest if mine else None, mine.sample_count if mine else 0, shadow_terminal
            )
            shadow_version, shadow_risk = shadow.run.version, shadow_score.risk_score
        # The profile as it was stays for the explanation (its hours and places too); the copy moves on.
        after = profile.copy()
        after.update(event)
        prepared = Prepared(
            new_state=after.to_bytes(),
            x=x,
            profile=profile,
            event=event,
            currency=currency,
            active=active,
            own=own,
            terminal=terminal,
            shadow_version=shadow_version,
            shadow_risk_score=shadow_risk,
        )
        if active is None:
            # Not scored: the decision is the operator's setting (review by default), never a score's.
            prepared.evaluation = Evaluation(
                risk_score=0.0,
                decision=self._no_model_decision,
                reasons=(self.models.no_model_reason(),),
                model_scope=ModelScope.NONE,
                model_version="",
                history_size=profile.count,
                cold_start=own is None,
                features=x.astype(np.float64).tobytes(),
                new_state=prepared.new_state,
                shadow_version=shadow_version,
                shadow_risk_score=shadow_risk,
            )
        return prepared

    def finish(self, batch: Sequence[object]) -> list[Evaluation]:
        """Score, explain and decide a batch of ``Prepared`` items at once: one forest pass per model."""
        prepared = [_as_prepared(item) for item in batch]
        by_model: dict[int, list[int]] = {}
        for row, item in enumerate(prepared):
            if item.evaluation is None:
                assert item.active is not None
                by_model.setdefault(id(item.active.model), []).append(row)
        for rows in by_model.values():
            self._finish_rows([prepared[row] for row in rows])
        now = time.time()
        for item in prepared:
            if item.policy is not None and item.evaluation is not None:
                # Lists and rules decide on top of the model (see domain.policy), in this same unit of work.
                item.evaluation = item.policy.apply(item.policy_input, item.evaluation, now=now)
        evaluations = [item.evaluation for item in prepared]
        assert all(evaluation is not None for evaluation in evaluations)
        return cast(list[Evaluation], evaluations)

    def _finish_rows(self, items: list[Prepared]) -> None:
        """Score rows of one active model together, then explain and decide each."""
        active = items[0].active
        assert active is not None
        model = active.model
        X = np.stack([item.x for item in items])  # noqa: N806 - a matrix
        scores = model.score_many(
            X,
            [item.own.forest if item.own else None for item in items],
            [item.own.sample_count if item.own else 0 for item in items],
            [item.terminal for item in items],
        )
        rarity = model.rarity_many(X)
        window = model.feedback.window_days if model.feedback is not None else None
        for item, score, row_rarity in zip(items, scores, rarity, strict=True):
            own = item.own
            reasons = tuple(
                StoredReason(r.code, r.message, r.weight)
                for r in explain(
                    model,
                    item.x,
                    score,
                    item.profile,
                    item.event,
                    currency=item.currency,
                    terminal=item.terminal,
                    window_days=window,
                    rarity=row_rarity,
                )
            )
            item.evaluation = Evaluation(
                risk_score=score.risk_score,
                decision=self._thresholds.decide(score.risk_score),
                reasons=reasons,
                model_scope=ModelScope.CUSTOMER if own is not None else ModelScope.GLOBAL,
                model_version=own.version if own is not None else active.version,
                history_size=item.profile.count,
                cold_start=own is None,
                features=item.x.astype(np.float64).tobytes(),
                new_state=item.new_state,
                shadow_version=item.shadow_version,
                shadow_risk_score=item.shadow_risk_score,
            )

    # -- outcomes and profiles ------------------------------------------------------------------------

    def report_outcome(
        self,
        transaction_id: str,
        outcome: str,
        *,
        reported_at: datetime | None,
        note: str,
        request_id: str,
        fingerprint: str,
        caller: str,
    ) -> tuple[OutcomeRecord, bool]:
        now = datetime.now(UTC)
        return self._outcomes.report_outcome(
            transaction_id,
            Outcome(outcome),
            reported_at=reported_at or now,
            note=note,
            request_id=request_id,
            fingerprint=fingerprint,
            caller=caller,
            now=now,
        )

    def profile(self, customer_id: str) -> RiskProfileView:
        summary = self._profiles.profile_summary(customer_id)
        active = self.models.current()
        own = self.models.customer(customer_id) if active is not None else None
        stored = self._customers.get(customer_id=customer_id)
        numbers = [stored.customer.primary, *stored.customer.sub_numbers]
        failed = sum(self._customers.failures("number", n.number) for n in numbers)
        enrollment = self._dynamic.get_enrollment(customer_id)
        if own is not None:
            scope, version = ModelScope.CUSTOMER.value, own.version
        elif active is not None:
            scope, version = ModelScope.GLOBAL.value, active.version
        else:
            scope, version = ModelScope.NONE.value, ""
        return RiskProfileView(
            customer_id=customer_id,
            transaction_count=summary.transaction_count,
            first_seen=summary.first_seen,
            last_seen=summary.last_seen,
            typical_amount_minor=summary.typical_amount_minor,
            currency=summary.typical_currency,
            active_scope=scope,
            active_version=version,
            history_size=summary.transaction_count,
            cold_start=own is None,
            failed_verifications=failed,
            dynamic_code_replays=enrollment.replays if enrollment is not None else 0,
            declines=summary.declines,
            reviews=summary.reviews,
            distinct_merchants=summary.distinct_merchants,
            distinct_terminals=summary.distinct_terminals,
        )


def _channel(name: str) -> Channel:
    try:
        return Channel(name.lower())
    except ValueError:
        return Channel.UNSPECIFIED
