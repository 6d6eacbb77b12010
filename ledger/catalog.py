"""The gateway's catalog (SQLite): patients' pseudonym mapping, studies, stored instances, nonces.

What it holds and why:
- `patients`: lookup key (keyed HMAC of issuer + patient ID, never the ID itself) -> the
  random on-chain `patientRef`. Erasing a patient deletes this row and the wrapped data keys
  (crypto-shredding); what the chain keeps then links to no one.
- `instances`: per stored SOP instance, its UIDs (needed to answer DICOMweb by UID), its
  pseudonymous refs, the IPFS CID of the ciphertext, plaintext and ciphertext SHA-256, and the
  data key wrapped by the key store's KEK. No names or patient IDs are stored.
- `seen_nonces`: request nonces inside the replay window, so a replayed request is refused
  even across a restart.
- `qido_attributes`: per stored SOP instance (keyed by its SOP Instance UID, with its
  patientRef), the QIDO-RS attributes of PS3.18 10.6 taken from the instance at upload
  (`DicomInstance.qido`, as JSON): these DO include PHI (Patient's Name, Patient ID, birth
  date, accession number, ...), because QIDO-RS matches on them. They live only here, in the
  gateway's protected catalog, never on-chain or in IPFS, and are only ever returned to a
  caller the consent rules let see the study. Erasing a patient deletes them
  (:meth:`Catalog.erase_patient_attributes`, together with the mapping and the data keys), and
  removing an instance deletes its row.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ledger.errors import Conflict

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    lookup_key   TEXT PRIMARY KEY,
    patient_ref  TEXT NOT NULL UNIQUE,
    created_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    modality            TEXT NOT NULL,
    patient_ref         TEXT NOT NULL,
    study_ref           TEXT NOT NULL,
    object_ref          TEXT NOT NULL,
    custodian           TEXT NOT NULL,
    cid                 TEXT NOT NULL,
    size                INTEGER NOT NULL,
    sha256              TEXT NOT NULL,
    cipher_size         INTEGER NOT NULL,
    cipher_sha256       TEXT NOT NULL,
    wrapped_key         BLOB NOT NULL,
    kek_id              TEXT NOT NULL,
    uploaded_ms         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_instance_uid);
CREATE INDEX IF NOT EXISTS instances_patient ON instances(patient_ref);
CREATE TABLE IF NOT EXISTS seen_nonces (
    signer     TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (signer, nonce)
);
CREATE TABLE IF NOT EXISTS qido_attributes (
    sop_instance_uid TEXT PRIMARY KEY,
    patient_ref      TEXT NOT NULL,
    attrs            TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS qido_patient ON qido_attributes(patient_ref);
CREATE TABLE IF NOT EXISTS justifications (
    commitment TEXT PRIMARY KEY,
    salt       TEXT NOT NULL,
    text       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class StoredInstance:
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    patient_ref: str
    study_ref: str
    object_ref: str
    custodian: str
    cid: str
    size: int
    sha256: str
    cipher_size: int
    cipher_sha256: str
    wrapped_key: bytes
    kek_id: str
    uploaded_ms: int


_INSTANCE_COLUMNS = tuple(StoredInstance.__dataclass_fields__)


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- patients ----------------------------------------------------------------------
    def patient_ref_for(self, lookup_key: str, new_ref: str) -> tuple[str, bool]:
        """The patientRef mapped to `lookup_key`, creating it as `new_ref` if absent. (ref, created)."""
        with self._tx() as db:
            row = db.execute("SELECT patient_ref FROM patients WHERE lookup_key=?", (lookup_key,)).fetchone()
            if row:
                return str(row[0]), False
            db.execute(
                "INSERT INTO patients(lookup_key, patient_ref, created_ms) VALUES (?,?,?)",
                (lookup_key, new_ref, int(time.time() * 1000)),
            )
            return new_ref, True

    def find_patient_ref(self, lookup_key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT patient_ref FROM patients WHERE lookup_key=?", (lookup_key,)
            ).fetchone()
        return str(row[0]) if row else None

    def patient_exists(self, patient_ref: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM patients WHERE patient_ref=?", (patient_ref,)).fetchone()
                is not None
            )

    # ---- instances ---------------------------------------------------------------------
    def add_instance(self, inst: StoredInstance) -> None:
        values = tuple(getattr(inst, c) for c in _INSTANCE_COLUMNS)
        placeholders = ",".join("?" * len(values))
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO instances({','.join(_INSTANCE_COLUMNS)}) VALUES ({placeholders})", values
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict("an instance with this SOP Instance UID is already stored") from exc

    def instance(self, sop_instance_uid: str) -> StoredInstance | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {','.join(_INSTANCE_COLUMNS)} FROM instances WHERE sop_instance_uid=?",
                (sop_instance_uid,),
            ).fetchone()
        return StoredInstance(*row) if row else None

    def study_instances(self, study_instance_uid: str) -> list[StoredInstance]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {','.join(_INSTANCE_COLUMNS)} FROM instances WHERE study_instance_uid=? "
                "ORDER BY series_instance_uid, sop_instance_uid",
                (study_instance_uid,),
            ).fetchall()
        return [StoredInstance(*r) for r in rows]

    def all_instances(self) -> list[StoredInstance]:
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(_INSTANCE_COLUMNS)} FROM instances").fetchall()
        return [StoredInstance(*r) for r in rows]

    def remove_instance(self, sop_instance_uid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
            db.execute("DELETE FROM qido_attributes WHERE sop_instance_uid=?", (sop_instance_uid,))

    # ---- QIDO-RS attributes (PHI; see the module docstring) -----------------------------
    def put_qido(self, sop_instance_uid: str, patient_ref: str, attrs: dict[str, str]) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO qido_attributes(sop_instance_uid, patient_ref, attrs) VALUES (?,?,?)",
                (sop_instance_uid, patient_ref, json.dumps(attrs, ensure_ascii=False, sort_keys=True)),
            )

    def all_qido(self) -> dict[str, dict[str, str]]:
        with self._lock:
            rows = self._db.execute("SELECT sop_instance_uid, attrs FROM qido_attributes").fetchall()
        return {str(r[0]): dict(json.loads(r[1])) for r in rows}

    def erase_patient_attributes(self, patient_ref: str) -> int:
        """Delete every stored QIDO attribute row of a patient (part of erasure); returns the count."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM qido_attributes WHERE patient_ref=?", (patient_ref,))
            return int(cur.rowcount)

    # ---- replay protection -------------------------------------------------------------
    def use_nonce(self, signer: str, nonce: str, expires_ms: int) -> bool:
        """Record a (signer, nonce); False if it was already seen (a replay)."""
        now = int(time.time() * 1000)
        with self._tx() as db:
            db.execute("DELETE FROM seen_nonces WHERE expires_ms < ?", (now,))
            try:
                db.execute(
                    "INSERT INTO seen_nonces(signer, nonce, expires_ms) VALUES (?,?,?)",
                    (signer, nonce, expires_ms),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    # ---- break-glass justifications (off-chain; only their commitment is anchored) ------
    def add_justification(self, commitment: str, salt: str, text: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO justifications(commitment, salt, text, created_ms) VALUES (?,?,?,?)",
                (commitment, salt, text, int(time.time() * 1000)),
            )

    def justification(self, commitment: str) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT salt, text FROM justifications WHERE commitment=?", (commitment,)
            ).fetchone()
        return (str(row[0]), str(row[1])) if row else None
