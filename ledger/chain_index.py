"""A local index of membership and consent state, kept current from contract events.

The gateway checks membership and consent on every request without asking the chain: this
index replays the contracts' events (`eth_getLogs`, standard JSON-RPC) into memory, polls for
new ones every `poll_interval` seconds, and applies the receipt of every change the gateway
relays itself at once. Each check first asserts the index is fresh: its last completed sync
must be no older than `max_staleness` seconds, or the check syncs synchronously, and fails
closed (503) if the chain cannot be reached. So a decision is made on chain state at most
`max_staleness` old, and state changes relayed by this gateway are visible immediately.

Every log is applied exactly once and in chain order: syncs are serialized, and a relayed
receipt is applied by syncing up to (and including) its block, never by applying its logs out
of order. (Applying a receipt's logs directly let a concurrent poll re-apply an older log over
them, e.g. re-create a consent just revoked or re-activate a member just removed.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eth_utils import event_abi_to_log_topic, to_checksum_address
from hexbytes import HexBytes
from web3._utils.events import get_event_data

from ledger.chain import ChainClient
from ledger.errors import StoreUnavailable
from ledger.purposes import purpose_bit

log = logging.getLogger("medledger.index")

ROLE_NAMES = {0: "none", 1: "hospital", 2: "auditor", 3: "gateway", 4: "admin"}


@dataclass
class MemberState:
    member_id: str
    key: str
    role: str
    name: str
    active: bool = True
    key_history: list[str] = field(default_factory=list)


@dataclass
class PatientState:
    patient_ref: str
    key: str
    enrolled_by: str
    delegates: dict[str, int] = field(default_factory=dict)  # address -> until (unix s)
    nonce: int = 0  # the contract's patientNonces: one per grant, revoke, key rotation, delegate


@dataclass
class ConsentState:
    consent_id: int
    patient_ref: str
    grantee: str
    study_ref: str  # "0x00..00" = all studies
    purposes: int
    not_before: int
    not_after: int
    version: int
    signer: str
    granted_at: int
    granted_block: int
    revoked_at: int | None = None

    def allows(self, grantee: str, study_ref: str, purpose: str, at: int) -> bool:
        return (
            self.grantee == grantee
            and (self.study_ref == ZERO32 or self.study_ref == study_ref)
            and bool(self.purposes >> purpose_bit(purpose) & 1)
            and self.not_before <= at < self.not_after
            and (self.revoked_at is None or at < self.revoked_at)
        )


ZERO32 = "0x" + "00" * 32


@dataclass(frozen=True)
class ConsentDecision:
    allowed: bool
    reason: str  # "" when allowed; else no_consent | consent_expired | consent_revoked | wrong_purpose | wrong_study
    consent: ConsentState | None


def _hex(v: Any) -> str:
    return HexBytes(v).to_0x_hex()


class ChainIndex:
    def __init__(
        self,
        chain: ChainClient,
        *,
        from_block: int = 0,
        poll_interval: float = 0.25,
        max_staleness: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.chain = chain
        self.poll_interval = poll_interval
        self.max_staleness = max_staleness
        self._clock = clock
        self._lock = threading.RLock()
        self._sync_lock = threading.Lock()  # one sync at a time, so logs apply once and in order
        self._next_block = from_block
        self._synced_at = 0.0  # monotonic time of the last completed sync
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.members: dict[str, MemberState] = {}
        self.key_to_member: dict[str, str] = {}
        self.patients: dict[str, PatientState] = {}
        self.consents: dict[int, ConsentState] = {}
        self._block_times: dict[int, int] = {}
        self._events: dict[bytes, tuple[str, dict[str, Any]]] = {}
        self._addresses = [chain.addresses["Membership"], chain.addresses["Consent"]]
        for contract_name in ("Membership", "Consent"):
            for item in chain.abis[contract_name]:
                if item.get("type") == "event":
                    self._events[event_abi_to_log_topic(item)] = (item["name"], item)  # type: ignore[arg-type]

    # ---- syncing -----------------------------------------------------------------------
    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._run, name="chain-index", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.sync()
            except Exception as exc:  # keep polling; freshness checks fail closed meanwhile
                log.warning("chain index sync failed: %s", type(exc).__name__)

    def sync(self, to_block: int | None = None) -> None:
        """Fetch and apply all events up to the current head (or up to `to_block`)."""
        started = time.monotonic()
        w3 = self.chain.w3
        with self._sync_lock:
            head = int(w3.eth.block_number) if to_block is None else to_block
            start = self._next_block
            if head >= start:
                logs = w3.eth.get_logs({"fromBlock": start, "toBlock": head, "address": self._addresses})
                logs = sorted(logs, key=lambda e: (int(e["blockNumber"]), int(e["logIndex"])))
                for entry in logs:
                    if int(entry["blockNumber"]) not in self._block_times and self._needs_time(entry):
                        self._block_time(int(entry["blockNumber"]))  # outside the state lock
                with self._lock:
                    for entry in logs:
                        self._apply_log(entry)
                    self._next_block = head + 1
        if to_block is None:
            with self._lock:
                self._synced_at = max(self._synced_at, started)

    def staleness(self) -> float:
        """Seconds since the start of the last completed sync (an upper bound on state age)."""
        with self._lock:
            return time.monotonic() - self._synced_at

    def ensure_fresh(self) -> None:
        if self.staleness() <= self.max_staleness:
            return
        try:
            self.sync()
        except Exception as exc:
            raise StoreUnavailable(
                "the chain is unreachable; membership and consent cannot be checked"
            ) from exc

    def apply_receipt(self, receipt: Any) -> None:
        """Make a transaction this gateway relayed visible at once: sync through its block.

        One `eth_getLogs` (on the relaying path, not a read's hot path); logs of earlier blocks
        not yet polled are applied first, so the state is the chain's state at that block.
        """
        block = int(receipt["blockNumber"])
        if block >= self._next_block:
            self.sync(to_block=block)

    def _needs_time(self, entry: Any) -> bool:
        topics = entry["topics"]
        found = self._events.get(bytes(HexBytes(topics[0]))) if topics else None
        return found is not None and found[0] == "ConsentGranted"

    def _block_time(self, number: int) -> int:
        if number not in self._block_times:
            self._block_times[number] = int(self.chain.w3.eth.get_block(number)["timestamp"])
        return self._block_times[number]

    def _apply_log(self, entry: Any) -> None:
        topics = entry["topics"]
        if not topics:
            return
        found = self._events.get(bytes(HexBytes(topics[0])))
        if found is None:
            return
        name, abi = found
        ev = get_event_data(self.chain.w3.codec, abi, entry)
        a = ev["args"]
        if name == "MemberAdded":
            mid = _hex(a["memberId"])
            key = to_checksum_address(a["key"])
            self.members[mid] = MemberState(mid, key, ROLE_NAMES[int(a["role"])], str(a["name"]), True, [key])
            self.key_to_member[key] = mid
        elif name == "MemberRemoved":
            mid = _hex(a["memberId"])
            if mid in self.members:
                self.members[mid].active = False
                self.key_to_member.pop(self.members[mid].key, None)
        elif name == "MemberRoleChanged":
            mid = _hex(a["memberId"])
            if mid in self.members:
                self.members[mid].role = ROLE_NAMES[int(a["newRole"])]
        elif name == "MemberKeyRotated":
            mid = _hex(a["memberId"])
            if mid in self.members:
                m = self.members[mid]
                self.key_to_member.pop(m.key, None)
                m.key = to_checksum_address(a["newKey"])
                m.key_history.append(m.key)
                self.key_to_member[m.key] = mid
        elif name == "PatientEnrolled":
            ref = _hex(a["patientRef"])
            self.patients[ref] = PatientState(
                ref, to_checksum_address(a["patientKey"]), _hex(a["hospitalId"])
            )
        elif name == "PatientKeyRotated":
            ref = _hex(a["patientRef"])
            if ref in self.patients:
                self.patients[ref].key = to_checksum_address(a["newKey"])
                self.patients[ref].nonce += 1
        elif name == "DelegateSet":
            ref = _hex(a["patientRef"])
            if ref in self.patients:
                self.patients[ref].delegates[to_checksum_address(a["delegate"])] = int(a["until"])
                self.patients[ref].nonce += 1
        elif name == "ConsentGranted":
            cid = int(a["consentId"])
            block = int(entry["blockNumber"])
            if _hex(a["patientRef"]) in self.patients:
                self.patients[_hex(a["patientRef"])].nonce += 1
            self.consents[cid] = ConsentState(
                consent_id=cid,
                patient_ref=_hex(a["patientRef"]),
                grantee=_hex(a["grantee"]),
                study_ref=_hex(a["studyRef"]),
                purposes=int(a["purposes"]),
                not_before=int(a["notBefore"]),
                not_after=int(a["notAfter"]),
                version=int(a["version"]),
                signer=to_checksum_address(a["signer"]),
                granted_at=self._block_time(block),
                granted_block=block,
            )
        elif name == "ConsentRevoked":
            cid = int(a["consentId"])
            if cid in self.consents:
                self.consents[cid].revoked_at = int(a["revokedAt"])
            if _hex(a["patientRef"]) in self.patients:
                self.patients[_hex(a["patientRef"])].nonce += 1

    # ---- queries -----------------------------------------------------------------------
    def member_by_key(self, key: str) -> MemberState | None:
        self.ensure_fresh()
        with self._lock:
            mid = self.key_to_member.get(key)
            m = self.members.get(mid) if mid else None
            return m if m and m.active and m.key == key else None

    def member(self, member_id: str) -> MemberState | None:
        with self._lock:
            return self.members.get(member_id)

    def patient(self, patient_ref: str) -> PatientState | None:
        self.ensure_fresh()
        with self._lock:
            return self.patients.get(patient_ref)

    def can_act_for(self, patient_ref: str, key: str) -> bool:
        """The contract's `canActFor`: the patient's current key or a delegate not yet expired."""
        p = self.patient(patient_ref)
        if p is None:
            return False
        return key == p.key or p.delegates.get(key, 0) >= int(self._clock())

    def acts_for_any_patient(self, key: str) -> bool:
        """Whether `key` is some enrolled patient's key or current delegate."""
        self.ensure_fresh()
        now = int(self._clock())
        with self._lock:
            return any(p.key == key or p.delegates.get(key, 0) >= now for p in self.patients.values())

    def consents_of(self, patient_ref: str) -> list[ConsentState]:
        with self._lock:
            return [c for c in self.consents.values() if c.patient_ref == patient_ref]

    def decide(
        self, patient_ref: str, grantee: str, study_ref: str, purpose: str, at: int | None = None
    ) -> ConsentDecision:
        """Whether a consent in force allows `grantee` to access `study_ref` for `purpose`.

        When nothing allows it, the reason names the closest rule that refused: a matching
        consent that was revoked, one that expired (or is not yet valid), one for another
        purpose, one for another study, or none at all.
        """
        self.ensure_fresh()
        when = int(self._clock()) if at is None else at
        with self._lock:
            mine = [
                c for c in self.consents.values() if c.patient_ref == patient_ref and c.grantee == grantee
            ]
        for c in sorted(mine, key=lambda c: -c.consent_id):
            if c.allows(grantee, study_ref, purpose, when):
                return ConsentDecision(True, "", c)
        bit = purpose_bit(purpose)
        with_purpose = [c for c in mine if c.purposes >> bit & 1]
        exact = [c for c in with_purpose if c.study_ref in (ZERO32, study_ref)]
        if any(c.revoked_at is not None and c.revoked_at <= when for c in exact):
            return ConsentDecision(False, "consent_revoked", None)
        if exact:
            return ConsentDecision(False, "consent_expired", None)
        if with_purpose:
            return ConsentDecision(False, "wrong_study", None)
        if any(c.study_ref in (ZERO32, study_ref) for c in mine):
            return ConsentDecision(False, "wrong_purpose", None)
        return ConsentDecision(False, "no_consent", None)
