"""HL7 v3 PurposeOfUse codes (code system 2.16.840.1.113883.5.8) and their on-chain bit numbers.

A consent's `purposes` field is a bitmask: bit `n` set means the purpose with bit `n` below.
The bit numbers are part of the on-chain format and never change; new codes get new bits.
"""

from __future__ import annotations

from ledger.errors import InvalidInput

CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"

# code: (bit, display)
PURPOSES: dict[str, tuple[int, str]] = {
    "TREAT": (0, "treatment"),
    "ETREAT": (1, "emergency treatment"),
    "HPAYMT": (2, "healthcare payment"),
    "HOPERAT": (3, "healthcare operations"),
    "HRESCH": (4, "healthcare research"),
    "PUBHLTH": (5, "public health"),
    "PATRQT": (6, "patient requested"),
    "FAMRQT": (7, "family requested"),
    "PWATRNY": (8, "power of attorney"),
    "SUPNWK": (9, "support network"),
    "COC": (10, "coordination of care"),
    "CLINTRL": (11, "clinical trial research"),
    "HMARKT": (12, "healthcare marketing"),
    "HLEGAL": (13, "legal"),
    "RECORDMGT": (14, "records management"),
    "TRAIN": (15, "training"),
}
BREAK_GLASS = "ETREAT"


def purpose_bit(code: str) -> int:
    try:
        return PURPOSES[code][0]
    except KeyError:
        raise InvalidInput(
            f"unknown purpose of use {code!r}; expected one of {', '.join(PURPOSES)}"
        ) from None


def purposes_mask(codes: list[str] | tuple[str, ...] | set[str]) -> int:
    if not codes:
        raise InvalidInput("at least one purpose of use is required")
    mask = 0
    for c in codes:
        mask |= 1 << purpose_bit(c)
    return mask


def purposes_of(mask: int) -> list[str]:
    return [code for code, (bit, _) in PURPOSES.items() if mask >> bit & 1]
