"""CSV export of the audit log: one row per event, the canonical fields plus the leaf hash.

Columns: every field of :class:`ledger.events.AuditEvent` in declaration order, then ``leaf``.
Integers are decimal, booleans ``true``/``false``, strings as they are. :func:`read_csv` turns
the rows back into events (and checks each row's leaf), so the CSV round-trips exactly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import fields

from ledger.errors import InvalidInput
from ledger.events import AuditEvent, leaf_hash

COLUMNS = [f.name for f in fields(AuditEvent)] + ["leaf"]
_INTS = {"seq", "time_ms", "consent_version", "v"}


def export_csv(events: Iterable[AuditEvent]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for ev in events:
        d = ev.to_dict()
        row = ["true" if d[c] is True else "false" if d[c] is False else str(d[c]) for c in COLUMNS[:-1]]
        writer.writerow([*row, "0x" + leaf_hash(ev).hex()])
    return out.getvalue()


def read_csv(text: str) -> list[AuditEvent]:
    """The events of a CSV written by :func:`export_csv`; raises InvalidInput on a bad row."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != COLUMNS:
        raise InvalidInput("not a MedLedger audit CSV (unexpected columns)")
    events = []
    for n, row in enumerate(reader, start=2):
        try:
            values: dict[str, object] = {}
            for c in COLUMNS[:-1]:
                raw = row[c]
                if c in _INTS:
                    values[c] = int(raw)
                elif c == "break_glass":
                    if raw not in ("true", "false"):
                        raise ValueError("break_glass must be true or false")
                    values[c] = raw == "true"
                else:
                    values[c] = raw
            ev = AuditEvent.from_dict(values)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"CSV line {n}: {exc}") from None
        if "0x" + leaf_hash(ev).hex() != row["leaf"]:
            raise InvalidInput(f"CSV line {n}: the leaf hash does not match the row")
        events.append(ev)
    return events
