"""Persistence for posguard: SQLAlchemy 2.x on SQLite or PostgreSQL, schema managed by Alembic.

Stores take a ``Database`` and return plain domain objects; ORM rows never leave this package. Modules that
define tables are imported here, so that ``schema.Base.metadata`` is complete wherever the package is used
(Alembic's environment and the schema tests compare the migrations against it).
"""

from posguard_server.store.api_keys import SqlApiKeyStore
from posguard_server.store.audit import SqlAuditStore
from posguard_server.store.cases import SqlCaseStore
from posguard_server.store.customers import SqlCustomerStore
from posguard_server.store.db import Database
from posguard_server.store.dynamic_codes import SqlDynamicCodeStore
from posguard_server.store.history import SqlHistoryStore
from posguard_server.store.issuance import SqlIssuanceStore
from posguard_server.store.model_registry import SqlModelRegistry
from posguard_server.store.outcomes import SqlOutcomeStore
from posguard_server.store.policy import SqlPolicyStore
from posguard_server.store.profiles import SqlProfileStore
from posguard_server.store.redemptions import SqlRedemptionStore
from posguard_server.store.scoring_writes import SqlScoringStore
from posguard_server.store.shadow import SqlShadowStore
from posguard_server.store.verifications import SqlVerificationStore
from posguard_server.store.watch import SqlNumberWatchStore
from posguard_server.store.write_probe import SqlWriteProbeStore

__all__ = [
    "Database",
    "SqlApiKeyStore",
    "SqlAuditStore",
    "SqlCaseStore",
    "SqlCustomerStore",
    "SqlDynamicCodeStore",
    "SqlHistoryStore",
    "SqlIssuanceStore",
    "SqlModelRegistry",
    "SqlNumberWatchStore",
    "SqlOutcomeStore",
    "SqlPolicyStore",
    "SqlProfileStore",
    "SqlRedemptionStore",
    "SqlScoringStore",
    "SqlShadowStore",
    "SqlVerificationStore",
    "SqlWriteProbeStore",
]
