"""Transaction risk: the plain objects the risk stores take and return.

Nothing here knows about SQL or gRPC. Enum values are the strings stored in the database, so renaming a
member is a schema change.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


class Channel(enum.Enum):
    """How a payment reached the gateway; the same spellings customer numbers use for their scope."""

    UNSPECIFIED = ""
    POS = "pos"
    ONLINE = "online"
    MOBILE = "mobile"


class Decision(enum.Enum):
    APPROVE = "APPROVE"
    REVIEW = "REVIEW"
    DECLINE = "DECLINE"


class ModelScope(enum.Enum):
    """Which model decided; NONE when a rule declined before any model ran (never in the registry)."""

    CUSTOMER = "CUSTOMER"
    GLOBAL = "GLOBAL"
    NONE = "NONE"


class ModelStatus(enum.Enum):
    CANDIDATE = "CANDIDATE"
    ACTIVE = "ACTIVE"
    SHADOW = "SHADOW"
    RETIRED = "RETIRED"


class Outcome(enum.Enum):
    """What a transaction turned out to be."""

    FRAUD = "FRAUD"
    CHARGEBACK = "CHARGEBACK"
    LEGITIMATE = "LEGITIMATE"

    @property
    def is_fraud(self) -> bool:
        """Whether the label marks the transaction as bad (kept out of training, positive in evaluation)."""
        return self is not Outcome.LEGITIMATE


class TransactionSource(enum.Enum):
    """How a transaction reached the store: imported history, or scored live."""

    IMPORT = "import"
    SCORE = "score"


@dataclass(frozen=True, slots=True)
class NewTransaction:
    """A transaction as given: the same for imported history and for a live score."""

    transaction_id: str
    customer_id: str
    event_time: datetime
    amount_minor: int
    currency: str
    merchant_id: str
    terminal_id: str = ""
    mcc: str = ""
    channel: Channel = Channel.UNSPECIFIED
    latitude: float | None = None
    longitude: float | None = None


# Event times: history may be replayed, so the past is fine back to this; the future only by clock skew.
EARLIEST_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)
CLOCK_SKEW = timedelta(minutes=5)


def event_time_refusal(value: datetime, now: datetime) -> str | None:
    """Why a transaction's (or an outcome's) time is refused, or None when it is accepted.

    One rule for every way a time gets in, scored live or imported from a file, so history never holds a
    row the API would have refused. The reason completes a sentence naming the field ("... must not ...").
    """
    if value < EARLIEST_EVENT_TIME:
        return "must not be before 2000-01-01"
    if value > now + CLOCK_SKEW:
        return "must not be more than 5 minutes in the future"
    return None


@dataclass(frozen=True, slots=True)
class StoredReason:
    """One reason behind a score: a feature that pushed it, or the rule that decided (weight 1)."""

    code: str
    message: str
    weight: float


@dataclass(frozen=True, slots=True)
class ProfileSnapshot:
    """A customer's feature profile; ``state`` is opaque to the store (another module encodes it)."""

    state: bytes
    transaction_count: int
    first_seen: datetime | None
    last_seen: datetime | None
    declines: int = 0
    reviews: int = 0


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the scorer decided for one transaction, given the customer's profile before it.

    ``new_state`` None leaves the profile exactly as it was (e.g. a rule decline for a revoked number).
    ``counts_in_history`` False stores the transaction for replay and reports only: it does not advance the
    profile's count or first/last seen, and ``history`` (training data) leaves it out.
    ``shadow_version`` and ``shadow_risk_score`` are what the shadow run (if one was running) scored the same
    transaction; they are stored for comparison and never change the answer ("" and None without one).
    """

    risk_score: float
    decision: Decision
    reasons: tuple[StoredReason, ...]
    model_scope: ModelScope
    model_version: str
    history_size: int
    cold_start: bool
    features: bytes | None
    new_state: bytes | None
    counts_in_history: bool = True
    shadow_version: str = ""
    shadow_risk_score: float | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The stored answer of a scored transaction: what ScoreTransaction returns, also on a replay."""

    risk_score: float
    decision: Decision
    reasons: tuple[StoredReason, ...]
    model_scope: ModelScope
    model_version: str
    history_size: int
    cold_start: bool
    scored_at: datetime


@dataclass(frozen=True, slots=True)
class StoredTransaction:
    """A stored transaction; ``answer`` is None for imported history."""

    transaction: NewTransaction
    source: TransactionSource
    answer: Answer | None
    in_history: bool
    features: bytes | None
    outcome: Outcome | None
    outcome_at: datetime | None


@dataclass(frozen=True, slots=True)
class HistoryBatch:
    """Stored transactions, one column per field, ordered by (customer_id, event_time, id).

    A batch always holds whole customers: a customer's history never spans two batches.
    """

    transaction_ids: tuple[str, ...]
    customer_ids: tuple[str, ...]
    event_times: tuple[datetime, ...]
    amounts_minor: tuple[int, ...]
    currencies: tuple[str, ...]
    merchant_ids: tuple[str, ...]
    terminal_ids: tuple[str, ...]
    mccs: tuple[str, ...]
    channels: tuple[Channel, ...]
    latitudes: tuple[float | None, ...]
    longitudes: tuple[float | None, ...]
    outcomes: tuple[Outcome | None, ...]
    # When each outcome was reported (None where there is none): what was known at a point in time.
    outcome_ats: tuple[datetime | None, ...]

    def __len__(self) -> int:
        return len(self.transaction_ids)


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """The label a report set on a transaction."""

    transaction_id: str
    customer_id: str
    outcome: Outcome
    outcome_at: datetime
    note: str


@dataclass(frozen=True, slots=True)
class LabelledTransaction:
    """A transaction labelled fraud or chargeback, for label-derived (merchant, terminal) risk features."""

    transaction_id: str
    customer_id: str
    merchant_id: str
    terminal_id: str
    event_time: datetime
    outcome: Outcome
    outcome_at: datetime


@dataclass(frozen=True, slots=True)
class ProfileSummary:
    """What GetCustomerRiskProfile shows, counted over the customer's stored transactions.

    ``transaction_count``, ``first_seen`` and ``last_seen`` cover the transactions that count in history;
    ``declines`` and ``reviews`` count every scored decision, rule declines included. The typical amount is
    the median amount in the customer's most used currency (None without transactions).
    """

    transaction_count: int
    first_seen: datetime | None
    last_seen: datetime | None
    declines: int
    reviews: int
    distinct_merchants: int
    distinct_terminals: int
    typical_amount_minor: int | None
    typical_currency: str


@dataclass(frozen=True, slots=True)
class NewModel:
    """A trained model to register as a CANDIDATE. ``customer_id`` is "" for the GLOBAL scope."""

    scope: ModelScope
    customer_id: str
    version: str
    created_at: datetime
    training_window_start: datetime
    training_window_end: datetime
    sample_count: int
    metrics: Mapping[str, float]
    artifact: bytes


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A registered model. ``customer_id`` is "" for GLOBAL; ``artifact`` is None where not loaded."""

    id: int
    scope: ModelScope
    customer_id: str
    version: str
    status: ModelStatus
    created_at: datetime
    training_window_start: datetime
    training_window_end: datetime
    sample_count: int
    metrics: Mapping[str, float]
    activated_at: datetime | None
    artifact: bytes | None
    # The checksum registered with the artifact (``artifact_digest``), read even where the artifact is not.
    artifact_sha256: str

    @property
    def active(self) -> bool:
        return self.status is ModelStatus.ACTIVE

    def verified_artifact(self) -> bytes:
        """The artifact, once it matches the checksum registered with it; ValueError when it is damaged.

        A damaged artifact can still parse (a flipped bit in a number, in a part of the archive nobody
        checks); the checksum is the one check that sees every change of every byte.
        """
        if self.artifact is None:
            raise ValueError(f"model {self.version} was read without its artifact")
        if artifact_digest(self.artifact) != self.artifact_sha256:
            raise ValueError(f"the artifact of model {self.version} does not match its checksum")
        return self.artifact


def artifact_digest(artifact: bytes) -> str:
    """The checksum the registry keeps of a model artifact: SHA-256, as 64 hex digits."""
    return hashlib.sha256(artifact).hexdigest()


@dataclass(frozen=True, slots=True)
class ShadowPairs:
    """Transactions scored while a run was in shadow, one column per field, in the order they were stored.

    ``active_scores`` are the answers' risk scores, ``shadow_scores`` what the shadow run scored the same
    transactions, ``fraud`` whether each is labelled FRAUD or CHARGEBACK now.
    """

    transaction_ids: tuple[str, ...]
    active_scores: tuple[float, ...]
    shadow_scores: tuple[float, ...]
    fraud: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.transaction_ids)


@dataclass(frozen=True, slots=True)
class Activation:
    """The result of a promotion or rollback: the model now active and the version it replaced ("" if none).

    ``changed`` is False when the model was already active, so nothing (not even the generation) changed.
    """

    model: ModelRecord
    previous_version: str
    changed: bool


@dataclass(frozen=True, slots=True)
class Promotion:
    """The result of promoting a training run (GLOBAL scope) or one customer's model (CUSTOMER scope).

    ``model`` is the model now active in the scope named: the run's GLOBAL model, or the customer's model;
    None for a run that trained customer models only (the active global model stays). ``previous_version``
    is the version that scope's slot held before ("" when it held none, and for a customer-only run).
    ``customer_models`` counts the CUSTOMER models this promotion made active. ``forced`` says ``force`` was
    given; ``overridden`` is the refusal it overrode ("" when there was none).
    """

    version: str
    model: ModelRecord | None
    previous_version: str
    customer_models: int
    forced: bool
    overridden: str = ""


@dataclass(frozen=True, slots=True)
class Rollback:
    """The result of rolling back a training run (GLOBAL scope) or one customer's model (CUSTOMER scope).

    ``rolled_back_version``'s models that were active are RETIRED now. ``model`` is the model active again
    in the scope named: the GLOBAL model the run had replaced, or the customer's previous model; None for a
    run without a GLOBAL model. ``customer_models_restored`` counts the CUSTOMER models active again,
    ``customer_models_retired`` those retired without a replacement: their customers are scored by the
    global model alone.
    """

    rolled_back_version: str
    model: ModelRecord | None
    customer_models_restored: int
    customer_models_retired: int


# -- promotion ------------------------------------------------------------------------------------------
# A retrain evaluates its candidates against the models active at that moment, on labelled outcomes, and
# stores the result with every model of the run under these metric names.

METRIC_AP = "average_precision"
METRIC_ROC_AUC = "roc_auc"
METRIC_RECALL = "recall_at_1pct"
METRIC_BASELINE_AP = "baseline_average_precision"
METRIC_BASELINE_ROC_AUC = "baseline_roc_auc"
METRIC_BASELINE_RECALL = "baseline_recall_at_1pct"
METRIC_EVALUATED_ROWS = "evaluated_rows"
METRIC_EVALUATED_FRAUD = "evaluated_fraud"
# When the comparison was made (epoch seconds): once a promotion or rollback activates any model after it, the
# baseline the candidate beat is no longer the one serving.
METRIC_EVALUATED_AT = "evaluated_at"


def promotion_refusal(
    metrics: Mapping[str, float], *, last_activation: datetime | None, has_active: bool
) -> str | None:
    """Why a candidate may not be promoted without ``force``; None when it may.

    A scope with nothing active has nothing the candidate could be worse than. Otherwise the candidate needs
    an evaluation on labelled outcomes made after ``last_activation`` (the latest moment any model became
    active), so against the models serving now, and an average precision at least theirs.
    """
    if not has_active:
        return None
    if METRIC_AP not in metrics or METRIC_BASELINE_AP not in metrics:
        return "the candidate has no evaluation against the active model on labelled outcomes"
    evaluated_at = metrics.get(METRIC_EVALUATED_AT)
    # Only activations count: putting a run in shadow and back changes what servers load, not what serves.
    if evaluated_at is None or (last_activation is not None and last_activation.timestamp() > evaluated_at):
        return "the active models changed after the candidate was evaluated; evaluate it again"
    if metrics[METRIC_AP] < metrics[METRIC_BASELINE_AP]:
        return (
            f"the candidate is worse than the active model on labelled outcomes "
            f"(average precision {metrics[METRIC_AP]:.4f} < {metrics[METRIC_BASELINE_AP]:.4f})"
        )
    return None
