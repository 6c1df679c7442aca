"""The lifecycle state machine, holder encryption, masking and the audit job's keystroke check."""

from __future__ import annotations

import itertools

import pytest
from cryptography.exceptions import InvalidTag

from posguard_server.domain.audit_report import close_pairs, one_keystroke_variants
from posguard_server.domain.customers import (
    LIFECYCLE,
    Holder,
    HolderCipher,
    NumberStatus,
    Transition,
    mask,
    next_status,
)
from posguard_server.domain.errors import FailedPrecondition

ALLOWED = {
    (NumberStatus.ACTIVE, Transition.SUSPEND): NumberStatus.SUSPENDED,
    (NumberStatus.SUSPENDED, Transition.REACTIVATE): NumberStatus.ACTIVE,
    (NumberStatus.ACTIVE, Transition.REVOKE): NumberStatus.REVOKED,
    (NumberStatus.SUSPENDED, Transition.REVOKE): NumberStatus.REVOKED,
    (NumberStatus.ACTIVE, Transition.ROTATE): NumberStatus.ROTATED,
    (NumberStatus.SUSPENDED, Transition.ROTATE): NumberStatus.ROTATED,
}


@pytest.mark.parametrize(("status", "action"), list(itertools.product(NumberStatus, Transition)))
def test_every_transition_is_either_allowed_or_failed_precondition(
    status: NumberStatus, action: Transition
) -> None:
    if (status, action) in ALLOWED:
        assert next_status(status, action) is ALLOWED[(status, action)]
    else:
        with pytest.raises(FailedPrecondition) as caught:
            next_status(status, action)
        assert caught.value.reason == "ILLEGAL_TRANSITION"
    assert LIFECYCLE == ALLOWED


def test_holder_encryption_round_trips_and_is_bound_to_its_customer() -> None:
    cipher = HolderCipher({1: b"k" * 32, 2: b"j" * 32})
    holder = Holder(name="Ada Lovelace", phone="+44 20 7946 0000")
    blob = cipher.encrypt(holder, "cus_1", 2)
    assert b"Ada" not in blob
    assert cipher.decrypt(blob, "cus_1", 2) == holder
    assert cipher.encrypt(holder, "cus_1", 2) != blob  # fresh nonce each time
    with pytest.raises(InvalidTag):
        cipher.decrypt(blob, "cus_2", 2)
    with pytest.raises(InvalidTag):
        cipher.decrypt(blob, "cus_1", 1)
    assert "Ada" not in repr(holder)


def test_mask_keeps_only_the_ends() -> None:
    assert mask("15642011021234567890") == "1564************7890"
    assert mask("1234") == "****"


def test_one_keystroke_variants_and_close_pairs() -> None:
    variants = list(one_keystroke_variants("123", "0123456789"))
    assert len(variants) == 3 * 9 + 2
    assert "213" in variants
    assert "124" in variants
    assert close_pairs(["12345", "12354", "99999", "12385"], "0123456789") == [
        ("12345", "12354"),  # adjacent transposition
        ("12345", "12385"),  # substitution
    ]
