"""Loading the number schemes and the number key ring an operator configured into a ``Numbering``."""

from __future__ import annotations

import json
import logging

from posguard_server.config import Settings
from posguard_server.domain.keyring import KeyRing, from_settings, load_or_create
from posguard_server.domain.numbering import Numbering
from posguard_server.domain.numbers import DEFAULT_SCHEME, Scheme

log = logging.getLogger(__name__)


class IssuerConfigError(ValueError):
    """The issuers file or the key ring cannot be used; the message says why, without key material."""


def load_schemes(settings: Settings) -> list[Scheme]:
    if settings.issuers_file is None:
        return [DEFAULT_SCHEME]
    try:
        entries = json.loads(settings.issuers_file.read_text())
        if not isinstance(entries, list) or not entries:
            raise IssuerConfigError("the issuers file must hold a non-empty JSON list of schemes")
        return [Scheme(**entry) for entry in entries]
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise IssuerConfigError(f"cannot use the issuers file {settings.issuers_file}: {error}") from None


def load_keys(settings: Settings) -> KeyRing:
    if settings.number_keys is not None:
        return from_settings(settings.number_keys.get_secret_value())
    # The embedded default generates its key on first start, readable by the service's user only.
    return load_or_create(settings.number_key_file)


def build_numbering(settings: Settings) -> Numbering:
    schemes = load_schemes(settings)
    keys = load_keys(settings)
    log.info("numbering: %d issuer(s), key version %d", len(schemes), keys.current)
    return Numbering(schemes, keys, default_issuer=settings.default_issuer)
