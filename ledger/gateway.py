"""The mediation gateway's core: every upload, read, share and consent change, and its audit.

The HTTP layer (`api/`) authenticates and parses; this module decides and records. Each
public method takes the authenticated :class:`Caller` and a :class:`RequestContext` that it
fills in (action, refs, consent) as it learns them, so that a refusal raised anywhere is
recorded with everything known at that point (see `api.errors`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from web3.logs import DISCARD

from devnet.manager import Devnet
from ledger.anchorer import Anchorer, read_chain_anchors
from ledger.audit_log import AuditLog
from ledger.catalog import Catalog, StoredInstance
from ledger.chain import ChainClient
from ledger.chain_index import ZERO32, ChainIndex, MemberState
from ledger.crypto import adecrypt_stream, aencrypt_stream, decrypt_bytes, new_data_key, unwrap_key, wrap_key
from ledger.dicom import DicomInstance, parse_instance
from ledger.errors import (
    Conflict,
    ConsentDenied,
    CorruptObject,
    Forbidden,
    InvalidInput,
    MedLedgerError,
    NotAMember,
    ReplayedRequest,
    UnknownInstance,
    UnknownPatient,
    UnknownStudy,
    WrongRole,
)
from ledger.events import Action, AuditEvent, EventDraft, Outcome, leaf_hash
from ledger.exports.jsonl import TreeLevels
from ledger.ipfs import KuboClient
from ledger.keyfiles import read_key
from ledger.keystore import KeyStore
from ledger.merkle import verify_inclusion
from ledger.pseudonym import new_patient_ref, object_ref, patient_lookup_key, study_ref
from ledger.purposes import BREAK_GLASS, PURPOSES, purpose_bit, purposes_mask, purposes_of
from ledger.reqsig import MAX_SKEW_S, VerifiedRequest, domain_separator
from ledger.research import RESEARCH_PURPOSE, ResearchContext, research_base_key, research_context
from ledger.verify import Report, verify_log

log = logging.getLogger("medledger.gateway")

DEFAULT_MAX_UPLOAD = 512 * 1024 * 1024
_UPLOAD_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    max_staleness: float = 2.0
    poll_interval: float = 0.25
    anchor_mode: str = "tree"
    anchor_delay: float = 0.5
    anchor_batch: int = 100_000


@dataclass(frozen=True)
class Caller:
    key: str
    kind: str  # "member" | "patient"
    actor: str  # member id or patientRef
    role: str  # hospital | auditor | gateway | admin | patient
    name: str = ""


@dataclass
class RequestContext:
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    action: str = Action.REQUEST
    caller: Caller | None = None
    signer: str = ""
    purpose: str = ""
    patient_ref: str = ""
    study_ref: str = ""
    object_ref: str = ""
    counterparty: str = ""
    recorded: bool = False


@dataclass(frozen=True)
class StowOutcome:
    stored: list[dict[str, Any]]
    failed: list[dict[str, Any]]


def _b32(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr.removeprefix("0x"))


class Gateway:
    def __init__(self, workdir: Path, devnet: Devnet, config: GatewayConfig | None = None) -> None:
        self.workdir = workdir
        self.devnet = devnet
        self.config = config or GatewayConfig()
        state = workdir / "gateway"
        state.mkdir(parents=True, exist_ok=True)
        self.keystore = KeyStore.open_or_create(state / "keystore.json")
        self.catalog = Catalog(state / "catalog.sqlite")
        self.audit = AuditLog(state / "audit.sqlite")
        # The catalog holds QIDO attributes and break-glass justifications: owner only.
        os.chmod(state, 0o700)
        for f in state.iterdir():
            if f.is_file():
                os.chmod(f, 0o600)
        gateway_key = read_key(Path(devnet.data["gateway"]["key_file"]))
        self.chain = ChainClient(devnet.rpc_url, devnet.abis(), devnet.contracts, gateway_key)
        self.member_id = str(devnet.data["gateway"]["member_id"])
        self.index = ChainIndex(
            self.chain,
            from_block=int(devnet.data.get("deploy_block", 0)),
            poll_interval=self.config.poll_interval,
            max_staleness=self.config.max_staleness,
        )
        self.anchorer = Anchorer(
            self.chain,
            self.audit,
            mode=self.config.anchor_mode,
            max_delay=self.config.anchor_delay,
            max_batch=self.config.anchor_batch,
        )
        self.ipfs = KuboClient(devnet.ipfs_api, offline=True)
        self.request_domain = domain_separator(devnet.chain_id, devnet.contracts["Membership"])

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.index.start()
        self.anchorer.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.anchorer.stop)
        self.index.stop()
        await self.ipfs.aclose()
        self.audit.close()
        self.catalog.close()

    def info(self) -> dict[str, Any]:
        return {
            "service": "medledger-gateway",
            "chain_id": self.devnet.chain_id,
            "contracts": self.devnet.contracts,
            "gateway": {
                "address": self.chain.account.address if self.chain.account else "",
                "member_id": self.member_id,
            },
            "request_signing": {
                "scheme": "EIP-712",
                "domain": {
                    "name": "MedLedger Gateway",
                    "version": "1",
                    "chainId": self.devnet.chain_id,
                    "verifyingContract": self.devnet.contracts["Membership"],
                },
                "max_skew_seconds": MAX_SKEW_S,
            },
            "purposes": {code: {"bit": bit, "display": d} for code, (bit, d) in PURPOSES.items()},
            "consent_index": {
                "max_staleness_seconds": self.config.max_staleness,
                "poll_interval_seconds": self.config.poll_interval,
            },
        }

    # ---- audit -------------------------------------------------------------------------
    def record(self, ctx: RequestContext, outcome: str, *, reason: str = "", **extra: Any) -> AuditEvent:
        caller = ctx.caller
        draft = EventDraft(
            action=str(ctx.action),
            outcome=outcome,
            actor=caller.actor if caller else "",
            actor_key=caller.key if caller else ctx.signer,
            actor_role=caller.role if caller else "",
            reason=reason,
            purpose=ctx.purpose,
            patient_ref=ctx.patient_ref,
            study_ref=ctx.study_ref,
            object_ref=ctx.object_ref,
            request_id=ctx.request_id,
            counterparty=ctx.counterparty,
            **extra,
        )
        event = self.audit.append(draft)
        self.anchorer.notify()
        ctx.recorded = True
        return event

    async def record_async(self, ctx: RequestContext, outcome: str, **kw: Any) -> AuditEvent:
        return await asyncio.to_thread(self.record, ctx, outcome, **kw)

    def record_refusal(self, ctx: RequestContext, err: MedLedgerError) -> None:
        if ctx.recorded:
            return
        if err.http_status >= 500:
            outcome = Outcome.FAILED
        elif err.http_status in (401, 403):
            outcome = Outcome.DENIED
        else:
            outcome = Outcome.REJECTED
        try:
            self.record(ctx, outcome, reason=err.code)
        except Exception:  # the refusal stands even if recording fails; say so in the log
            log.exception("could not record a refusal (request %s)", ctx.request_id)

    # ---- authentication ------------------------------------------------------------------
    def check_replay(self, verified: VerifiedRequest) -> None:
        expires = (verified.timestamp + MAX_SKEW_S + 5) * 1000
        if not self.catalog.use_nonce(verified.signer, "0x" + verified.nonce.hex(), expires):
            raise ReplayedRequest("this request was already received (nonce reused)")

    def member_caller(self, signer: str, roles: tuple[str, ...]) -> Caller:
        m: MemberState | None = self.index.member_by_key(signer)
        if m is None:
            raise NotAMember("the signing key is not an active member of the consortium")
        caller = Caller(key=signer, kind="member", actor=m.member_id, role=m.role, name=m.name)
        if roles and m.role not in roles:
            raise WrongRole(f"role {m.role} may not call this endpoint (allowed: {', '.join(roles)})")
        return caller

    def patient_caller(self, signer: str, patient_ref: str) -> Caller:
        if not self.index.can_act_for(patient_ref, signer):
            raise Forbidden(
                "the signing key is not this patient's enrolled key or delegate", code="not_patient"
            )
        p = self.index.patient(patient_ref)
        role = "patient" if p is not None and p.key == signer else "delegate"
        return Caller(key=signer, kind="patient", actor=patient_ref, role=role)

    # ---- upload (STOW-RS) ----------------------------------------------------------------
    async def store_instances(self, caller: Caller, ctx: RequestContext, parts: list[bytes]) -> StowOutcome:
        ctx.action = Action.UPLOAD
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for data in parts:
            sub = replace(ctx, request_id=ctx.request_id, recorded=False)
            try:
                stored.append(await self._store_one(caller, sub, data))
            except MedLedgerError as err:
                self.record_refusal(sub, err)
                failed.append({"reason": err.code, "message": err.message, **self._uids_for_failure(data)})
        ctx.recorded = True
        return StowOutcome(stored, failed)

    @staticmethod
    def _uids_for_failure(data: bytes) -> dict[str, str]:
        # Best effort, for the Failed SOP Sequence only: never used to store anything.
        try:
            from io import BytesIO

            import pydicom

            ds = pydicom.dcmread(
                BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            return {
                "sop_class_uid": str(ds.get("SOPClassUID", "")),
                "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            }
        except Exception:
            return {"sop_class_uid": "", "sop_instance_uid": ""}

    async def _store_one(self, caller: Caller, ctx: RequestContext, data: bytes) -> dict[str, Any]:
        inst: DicomInstance = parse_instance(data, max_size=self.config.max_upload_bytes)
        pkey = self.keystore.pseudonym_key
        ctx.study_ref = study_ref(pkey, inst.study_instance_uid)
        ctx.object_ref = object_ref(pkey, inst.sop_instance_uid)
        lookup = patient_lookup_key(pkey, inst.issuer_of_patient_id, inst.patient_id)
        existing_ref = self.catalog.find_patient_ref(lookup)
        if existing_ref:
            ctx.patient_ref = existing_ref
        existing = self.catalog.instance(inst.sop_instance_uid)
        if existing is not None:
            if existing.sha256 == inst.sha256:
                self.record(ctx, Outcome.OK, reason="already_stored")
                return self._stored_item(existing)
            raise Conflict(
                "a different object with this SOP Instance UID is already stored",
                code="sop_instance_conflict",
            )
        study_rows = self.catalog.study_instances(inst.study_instance_uid)
        if study_rows and study_rows[0].custodian != caller.actor:
            raise Forbidden("this study is held by another institution", code="not_custodian")
        patient_ref, _ = self.catalog.patient_ref_for(lookup, existing_ref or new_patient_ref())
        ctx.patient_ref = patient_ref
        if study_rows and study_rows[0].patient_ref != patient_ref:
            raise InvalidInput(
                "the instance's patient differs from its study's patient", code="patient_mismatch"
            )
        aad = _b32(ctx.object_ref)
        data_key = new_data_key()
        # Encrypted as it is sent to IPFS (STREAM segments), hashed on the way: the ciphertext
        # is never held whole, next to the plaintext.
        cipher_hash, cipher_size = hashlib.sha256(), 0

        async def plain_chunks() -> AsyncIterator[bytes]:
            view = memoryview(data)
            for start in range(0, len(view), _UPLOAD_CHUNK):
                yield bytes(view[start : start + _UPLOAD_CHUNK])

        async def cipher_chunks() -> AsyncIterator[bytes]:
            nonlocal cipher_size
            async for chunk in aencrypt_stream(plain_chunks(), data_key, aad):
                cipher_hash.update(chunk)
                cipher_size += len(chunk)
                yield chunk

        cid = await self.ipfs.add(cipher_chunks())
        try:
            wrapped = wrap_key(self.keystore.kek, data_key, aad + self.keystore.kek_id.encode())
            row = StoredInstance(
                sop_instance_uid=inst.sop_instance_uid,
                sop_class_uid=inst.sop_class_uid,
                series_instance_uid=inst.series_instance_uid,
                study_instance_uid=inst.study_instance_uid,
                transfer_syntax_uid=inst.transfer_syntax_uid,
                modality=inst.modality,
                patient_ref=patient_ref,
                study_ref=ctx.study_ref,
                object_ref=ctx.object_ref,
                custodian=caller.actor,
                cid=cid,
                size=len(data),
                sha256=inst.sha256,
                cipher_size=cipher_size,
                cipher_sha256=cipher_hash.hexdigest(),
                wrapped_key=wrapped,
                kek_id=self.keystore.kek_id,
                uploaded_ms=int(time.time() * 1000),
            )
            self.catalog.add_instance(row)
            self.catalog.put_qido(row.sop_instance_uid, patient_ref, dict(inst.qido))
        except BaseException:
            await self._unpin_unless_used(cid)
            raise
        await self.record_async(ctx, Outcome.OK)
        return self._stored_item(row)

    async def _unpin_unless_used(self, cid: str) -> None:
        if any(i.cid == cid for i in self.catalog.all_instances()):
            return
        try:
            await self.ipfs.pin_rm(cid)
        except MedLedgerError:
            log.warning("could not unpin an object of a failed upload")

    @staticmethod
    def _stored_item(row: StoredInstance) -> dict[str, Any]:
        return {
            "sop_class_uid": row.sop_class_uid,
            "sop_instance_uid": row.sop_instance_uid,
            "study_instance_uid": row.study_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "cid": row.cid,
            "study_ref": row.study_ref,
            "patient_ref": row.patient_ref,
        }

    # ---- retrieve (WADO-RS) ----------------------------------------------------------------
    def authorize_read(
        self,
        caller: Caller,
        ctx: RequestContext,
        row: StoredInstance,
        purpose: str,
        justification: str | None,
    ) -> dict[str, Any]:
        """Decide a read; returns the audit fields of the VIEW. Raises ConsentDenied."""
        ctx.patient_ref, ctx.study_ref, ctx.object_ref = row.patient_ref, row.study_ref, row.object_ref
        if not purpose:
            raise InvalidInput(
                "a purpose of use is required (X-MedLedger-Purpose header)", code="missing_purpose"
            )
        purpose_bit(purpose)
        ctx.purpose = purpose
        if caller.actor == row.custodian and purpose != RESEARCH_PURPOSE:
            return {}  # a research read needs the patient's consent, the custodian's too
        if justification is not None:
            if purpose != BREAK_GLASS:
                raise ConsentDenied("break-glass access is only for purpose ETREAT", code="wrong_purpose")
            text = justification.strip()
            if len(text) < 10:
                raise InvalidInput(
                    "a break-glass read needs a written justification (10+ characters)",
                    code="missing_justification",
                )
            salt = secrets.token_hex(16)
            commitment = "0x" + hashlib.sha256(bytes.fromhex(salt) + text.encode()).hexdigest()
            self.catalog.add_justification(commitment, salt, text)
            return {"break_glass": True, "justification_commitment": commitment}
        decision = self.index.decide(row.patient_ref, caller.actor, row.study_ref, purpose)
        if not decision.allowed or decision.consent is None:
            raise ConsentDenied(_CONSENT_MESSAGES[decision.reason], code=decision.reason)
        return {"consent_id": str(decision.consent.consent_id), "consent_version": decision.consent.version}

    async def read_instance(self, row: StoredInstance) -> bytes:
        cipher = await self.ipfs.cat_bytes(row.cid)
        if hashlib.sha256(cipher).hexdigest() != row.cipher_sha256:
            raise CorruptObject("the stored object failed its content check")
        aad = _b32(row.object_ref)
        data_key = unwrap_key(self.keystore.kek_for(row.kek_id), row.wrapped_key, aad + row.kek_id.encode())
        plain = await asyncio.to_thread(decrypt_bytes, cipher, data_key, aad)
        if hashlib.sha256(plain).hexdigest() != row.sha256:
            raise CorruptObject("the decrypted object failed its content check")
        return plain

    def find_instance(self, study_uid: str, series_uid: str | None, sop_uid: str) -> StoredInstance:
        row = self.catalog.instance(sop_uid)
        if (
            row is None
            or row.study_instance_uid != study_uid
            or (series_uid and row.series_instance_uid != series_uid)
        ):
            raise UnknownInstance("no such instance in this study/series")
        return row

    def find_study(self, study_uid: str) -> list[StoredInstance]:
        rows = self.catalog.study_instances(study_uid)
        if not rows:
            raise UnknownStudy("no such study")
        return rows

    async def retrieve(
        self,
        caller: Caller,
        ctx: RequestContext,
        rows: list[StoredInstance],
        purpose: str,
        justification: str | None,
    ) -> list[bytes]:
        ctx.action = Action.VIEW
        grants = [self.authorize_read(caller, ctx, r, purpose, justification) for r in rows[:1]]
        out: list[bytes] = []
        for row in rows:
            out.append(await self.read_instance(row))
        if purpose == RESEARCH_PURPOSE:  # never the original: de-identified copies only
            out = await self._deidentify_copies(caller, ctx, rows, out, grants[0])
        for row in rows:
            sub = replace(ctx, object_ref=row.object_ref, recorded=False)
            await self.record_async(sub, Outcome.OK, **grants[0])
        ctx.recorded = True
        return out

    async def retrieve_streams(
        self,
        caller: Caller,
        ctx: RequestContext,
        rows: list[StoredInstance],
        purpose: str,
        justification: str | None,
    ) -> list[AsyncIterator[bytes]]:
        """Streaming :meth:`retrieve` of the stored bytes (no research copies, no transcoding):
        one lazy iterator of plaintext chunks per row, memory bounded by a few segments.

        Audit contract. The read is authorized and each object's VIEW event is recorded
        (durably, like every event) here, BEFORE any byte is returned: the caller starts its
        response only after this returns. The integrity checks of an object (ciphertext size and
        SHA-256 against the catalog, every STREAM segment tag, plaintext size and SHA-256) can
        only complete at its end; the last segment is held back until they all pass, so a
        complete object is never delivered unverified. If a check fails (or the store fails)
        part way, the iterator records a FAILED VIEW event for that object with the error code
        and raises the error: the HTTP layer has already sent headers, so the connection is
        aborted and the client sees a truncated body (short of its Content-Length), never a
        complete one. The OK event then stands for "released after authorization", the FAILED
        one for "the release did not complete".
        """
        if purpose == RESEARCH_PURPOSE:
            raise ValueError("research reads return de-identified copies; use retrieve()")
        ctx.action = Action.VIEW
        grant = self.authorize_read(caller, ctx, rows[0], purpose, justification)
        keys = [self._data_key(row) for row in rows]  # a bad key fails before the response
        for row in rows:
            sub = replace(ctx, object_ref=row.object_ref, recorded=False)
            await self.record_async(sub, Outcome.OK, **grant)
        ctx.recorded = True
        return [self._stream_instance(ctx, row, key, grant) for row, key in zip(rows, keys, strict=True)]

    def _data_key(self, row: StoredInstance) -> bytes:
        aad = _b32(row.object_ref)
        return unwrap_key(self.keystore.kek_for(row.kek_id), row.wrapped_key, aad + row.kek_id.encode())

    async def _stream_instance(
        self, ctx: RequestContext, row: StoredInstance, data_key: bytes, grant: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        cipher_hash = hashlib.sha256()
        plain_hash = hashlib.sha256()
        cipher_seen = 0
        plain_seen = 0

        async def cipher() -> AsyncIterator[bytes]:
            nonlocal cipher_seen
            async for chunk in self.ipfs.cat(row.cid):
                cipher_seen += len(chunk)
                if cipher_seen > row.cipher_size:
                    raise CorruptObject("the stored object failed its content check (size)")
                cipher_hash.update(chunk)
                yield chunk

        segments = adecrypt_stream(cipher(), data_key, _b32(row.object_ref))
        try:
            held: bytes | None = None
            async for segment in segments:
                if held is not None:
                    yield held
                plain_seen += len(segment)
                if plain_seen > row.size:
                    raise CorruptObject("the decrypted object failed its content check (size)")
                plain_hash.update(segment)
                held = segment
            if cipher_seen != row.cipher_size or cipher_hash.hexdigest() != row.cipher_sha256:
                raise CorruptObject("the stored object failed its content check")
            if plain_seen != row.size or plain_hash.hexdigest() != row.sha256:
                raise CorruptObject("the decrypted object failed its content check")
            if held is not None:
                yield held
        except MedLedgerError as err:
            log.warning("a streamed read was aborted (request %s): %s", ctx.request_id, err.code)
            sub = replace(ctx, object_ref=row.object_ref, recorded=False)
            await self.record_async(sub, Outcome.FAILED, reason=err.code, **grant)
            raise
        finally:
            await segments.aclose()  # type: ignore[attr-defined]

    # ---- research share (HRESCH), WADO-RS addressing, QIDO-RS -------------------------------
    def research_context(self, reader: str, study_uid: str, patient_ref: str) -> ResearchContext:
        """The de-identification context of one study for one reader (see `ledger.research`)."""
        base = research_base_key(self.keystore.pseudonym_key)
        return research_context(base, reader, study_uid, patient_ref)

    async def _deidentify_copies(
        self,
        caller: Caller,
        ctx: RequestContext,
        rows: list[StoredInstance],
        datas: list[bytes],
        grant: dict[str, Any],
    ) -> list[bytes]:
        """De-identified copies of a study's instances; one DEIDENTIFY event per source object."""
        from ledger.deid import DeidError
        from ledger.research import deidentify_bytes

        dctx = self.research_context(caller.actor, rows[0].study_instance_uid, rows[0].patient_ref)
        copies: list[bytes] = []
        for data in datas:
            try:
                copies.append(await asyncio.to_thread(deidentify_bytes, data, dctx))
            except DeidError:
                raise Forbidden(
                    "an instance of this request cannot be de-identified for research "
                    "(e.g. burned-in annotation), so it is not released",
                    code="not_deidentifiable",
                ) from None
        for row in rows:
            sub = replace(ctx, action=Action.DEIDENTIFY, object_ref=row.object_ref, recorded=False)
            await self.record_async(sub, Outcome.OK, **grant)
        return copies

    def find_rows(
        self,
        caller: Caller,
        purpose: str,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[StoredInstance]:
        """The stored instances a WADO-RS path names, in study order.

        For a research read (HRESCH) the path may use the UIDs of the reader's de-identified
        copies (as QIDO-RS returned them); they are mapped back here, never shown."""
        rows = self.catalog.study_instances(study_uid)
        uid_of: dict[str, tuple[str, str]] = {
            r.sop_instance_uid: (r.series_instance_uid, r.sop_instance_uid) for r in rows
        }
        if not rows and purpose == RESEARCH_PURPOSE:
            studies: dict[str, list[StoredInstance]] = {}
            for r in self.catalog.all_instances():
                studies.setdefault(r.study_instance_uid, []).append(r)
            for suid, srows in studies.items():
                dctx = self.research_context(caller.actor, suid, srows[0].patient_ref)
                if dctx.map_uid(suid) == study_uid:
                    rows = sorted(srows, key=lambda r: (r.series_instance_uid, r.sop_instance_uid))
                    uid_of = {
                        r.sop_instance_uid: (
                            dctx.map_uid(r.series_instance_uid),
                            dctx.map_uid(r.sop_instance_uid),
                        )
                        for r in rows
                    }
                    break
        if not rows:
            raise UnknownStudy("no such study")
        if series_uid:
            rows = [r for r in rows if series_uid in (r.series_instance_uid, uid_of[r.sop_instance_uid][0])]
            if not rows:
                raise UnknownInstance("no such series in this study", code="unknown_series")
        if sop_uid:
            rows = [r for r in rows if sop_uid in (r.sop_instance_uid, uid_of[r.sop_instance_uid][1])]
            if not rows:
                raise UnknownInstance("no such instance in this study/series")
        return rows

    def query(
        self,
        caller: Caller,
        ctx: RequestContext,
        level: str,
        params: list[tuple[str, str]],
        purpose: str,
        base_url: str,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """QIDO-RS over what the caller may see; one QUERY event with the number of matches.

        Visible: the caller's own (custodial) studies, and, when a purpose is stated, the
        studies a consent in force lets the caller access for that purpose. For HRESCH only
        consented studies (the custodian's too), and only as their de-identified copies would
        show them (attributes, UIDs and dates as in `ledger.research`)."""
        from ledger.qido import Record, parse_query, search
        from ledger.research import deidentify_attrs

        ctx.action = Action.QUERY
        query = parse_query(level, params)
        if purpose:
            purpose_bit(purpose)
            ctx.purpose = purpose
        research = purpose == RESEARCH_PURPOSE
        stored_attrs = self.catalog.all_qido()
        studies: dict[str, list[StoredInstance]] = {}
        for row in self.catalog.all_instances():
            studies.setdefault(row.study_instance_uid, []).append(row)
        records: list[tuple[Record, StoredInstance]] = []
        for suid, rows in studies.items():
            first = rows[0]
            own = first.custodian == caller.actor and not research
            if not own and not (
                purpose
                and self.index.decide(first.patient_ref, caller.actor, first.study_ref, purpose).allowed
            ):
                continue
            dctx = self.research_context(caller.actor, suid, first.patient_ref) if research else None
            for row in rows:
                attrs = dict(stored_attrs.get(row.sop_instance_uid, {}))
                attrs.update(
                    StudyInstanceUID=row.study_instance_uid,
                    SeriesInstanceUID=row.series_instance_uid,
                    SOPInstanceUID=row.sop_instance_uid,
                    SOPClassUID=row.sop_class_uid,
                )
                if row.modality:
                    attrs.setdefault("Modality", row.modality)
                if dctx is not None:
                    attrs = deidentify_attrs(attrs, dctx)
                records.append((Record(attrs), row))
        if study_uid:
            records = [(r, row) for r, row in records if r.get("StudyInstanceUID") == study_uid]
            if records:
                ctx.patient_ref, ctx.study_ref = records[0][1].patient_ref, records[0][1].study_ref
        if series_uid:
            records = [(r, row) for r, row in records if r.get("SeriesInstanceUID") == series_uid]
        results, total = search(
            query,
            [r for r, _ in records],
            base_url,
            study_in_path=bool(study_uid),
            series_in_path=bool(series_uid),
        )
        self.record(ctx, Outcome.OK, reason=f"matches:{total}")
        return results, list(query.warnings)

    def _relay(self, contract: str, function: str, *args: Any) -> Any:
        """Send a signed message on-chain, wait for it, and apply it to the index at once
        (so the change this gateway relays is in force for its very next decision)."""
        receipt = self.chain.transact(contract, function, *args)
        self.index.apply_receipt(receipt)
        return receipt

    # ---- patients ----------------------------------------------------------------------
    def lookup_patient(self, caller: Caller, ctx: RequestContext, issuer: str, patient_id: str) -> str:
        ctx.action = Action.QUERY
        if not patient_id:
            raise InvalidInput("patient_id is required")
        lookup = patient_lookup_key(self.keystore.pseudonym_key, issuer, patient_id)
        ref, _ = self.catalog.patient_ref_for(lookup, new_patient_ref())
        ctx.patient_ref = ref
        self.record(ctx, Outcome.OK)
        return ref

    def enroll(
        self,
        caller: Caller,
        ctx: RequestContext,
        patient_ref: str,
        patient_key: str,
        deadline: int,
        signature: str,
    ) -> dict[str, Any]:
        ctx.action, ctx.patient_ref = Action.ENROLL, patient_ref
        if not self.catalog.patient_exists(patient_ref):
            raise UnknownPatient("no such patient")
        receipt = self._relay("Consent", "enroll", _b32(patient_ref), patient_key, deadline, _b32(signature))
        self.record(ctx, Outcome.OK)
        return {
            "patient_ref": patient_ref,
            "patient_key": patient_key,
            "tx": receipt["transactionHash"].to_0x_hex(),
        }

    def patient_info(self, caller: Caller, ctx: RequestContext, patient_ref: str) -> dict[str, Any]:
        ctx.action, ctx.patient_ref = Action.QUERY, patient_ref
        p = self.index.patient(patient_ref)
        if p is None:
            raise UnknownPatient("no such patient")
        nonce = p.nonce  # from the index: no chain call per request
        studies: dict[str, dict[str, Any]] = {}
        for row in self.catalog.all_instances():
            if row.patient_ref == patient_ref:
                s = studies.setdefault(
                    row.study_ref,
                    {
                        "study_ref": row.study_ref,
                        "study_instance_uid": row.study_instance_uid,
                        "modalities": set(),
                        "instances": 0,
                        "custodian": row.custodian,
                    },
                )
                s["modalities"].add(row.modality)
                s["instances"] += 1
        consents = [self._consent_json(c) for c in self.index.consents_of(patient_ref)]
        self.record(ctx, Outcome.OK)
        return {
            "patient_ref": patient_ref,
            "key": p.key,
            "nonce": nonce,
            "delegates": {d: until for d, until in p.delegates.items() if until >= int(time.time())},
            "studies": [
                {**s, "modalities": sorted(s["modalities"]), "custodian_name": self._name(s["custodian"])}
                for s in studies.values()
            ],
            "consents": consents,
        }

    def _name(self, member_id: str) -> str:
        m = self.index.member(member_id)
        return m.name if m else ""

    def _consent_json(self, c: Any) -> dict[str, Any]:
        return {
            "consent_id": c.consent_id,
            "grantee": c.grantee,
            "grantee_name": self._name(c.grantee),
            "study_ref": None if c.study_ref == ZERO32 else c.study_ref,
            "purposes": purposes_of(c.purposes),
            "not_before": c.not_before,
            "not_after": c.not_after,
            "version": c.version,
            "revoked_at": c.revoked_at,
        }

    # ---- consent -----------------------------------------------------------------------
    def grant(
        self, caller: Caller, ctx: RequestContext, grant: dict[str, Any], signature: str
    ) -> dict[str, Any]:
        ctx.action, ctx.patient_ref = Action.CONSENT_GRANT, str(grant["patient_ref"])
        ctx.counterparty = str(grant["grantee"])
        study = str(grant.get("study_ref") or ZERO32)
        ctx.study_ref = "" if study == ZERO32 else study
        purposes = grant["purposes"]
        mask = purposes_mask(purposes) if isinstance(purposes, list) else int(purposes)
        args = (
            _b32(grant["patient_ref"]),
            _b32(grant["grantee"]),
            _b32(study),
            mask,
            int(grant["not_before"]),
            int(grant["not_after"]),
            int(grant["nonce"]),
        )
        receipt = self._relay("Consent", "grant", args, _b32(signature))
        ev = self.chain.contract("Consent").events.ConsentGranted().process_receipt(receipt, errors=DISCARD)
        consent_id = int(ev[0]["args"]["consentId"])
        self.record(ctx, Outcome.OK, consent_id=str(consent_id), consent_version=1)
        return {
            "consent_id": consent_id,
            "tx": receipt["transactionHash"].to_0x_hex(),
            "purposes": purposes_of(mask),
        }

    def rotate_patient_key(
        self, caller: Caller, ctx: RequestContext, patient_ref: str, new_key: str, nonce: int, signature: str
    ) -> dict[str, Any]:
        """Relay the patient's key rotation (signed with the current key); effective at once."""
        ctx.action, ctx.patient_ref = Action.PATIENT_KEY_ROTATE, patient_ref
        receipt = self._relay(
            "Consent", "rotatePatientKey", _b32(patient_ref), new_key, nonce, _b32(signature)
        )
        self.record(ctx, Outcome.OK)
        return {
            "patient_ref": patient_ref,
            "patient_key": new_key,
            "tx": receipt["transactionHash"].to_0x_hex(),
        }

    def set_delegate(
        self,
        caller: Caller,
        ctx: RequestContext,
        patient_ref: str,
        delegate: str,
        until: int,
        nonce: int,
        signature: str,
    ) -> dict[str, Any]:
        """Relay the patient's appointment of a delegate until `until` (0 or past: removal)."""
        ctx.action, ctx.patient_ref = Action.DELEGATE_SET, patient_ref
        receipt = self._relay(
            "Consent", "setDelegate", _b32(patient_ref), delegate, until, nonce, _b32(signature)
        )
        self.record(ctx, Outcome.OK)
        return {
            "patient_ref": patient_ref,
            "delegate": delegate,
            "until": until,
            "tx": receipt["transactionHash"].to_0x_hex(),
        }

    def revoke(
        self, caller: Caller, ctx: RequestContext, consent_id: int, nonce: int, signature: str
    ) -> dict[str, Any]:
        ctx.action = Action.CONSENT_REVOKE
        c = self.index.consents.get(consent_id)
        if c is None:
            raise InvalidInput("no such consent", code="unknown_consent")
        ctx.patient_ref, ctx.counterparty = c.patient_ref, c.grantee
        receipt = self._relay("Consent", "revoke", consent_id, nonce, _b32(signature))
        self.record(ctx, Outcome.OK, consent_id=str(consent_id), consent_version=c.version)
        return {"consent_id": consent_id, "revoked": True, "tx": receipt["transactionHash"].to_0x_hex()}

    # ---- share ---------------------------------------------------------------------------
    def share(
        self, caller: Caller, ctx: RequestContext, study_uid: str, to_member: str, purpose: str
    ) -> dict[str, Any]:
        ctx.action = Action.SHARE
        rows = self.find_study(study_uid)
        row = rows[0]
        ctx.patient_ref, ctx.study_ref, ctx.counterparty = row.patient_ref, row.study_ref, to_member
        purpose_bit(purpose)
        ctx.purpose = purpose
        target = self.index.member(to_member)
        if target is None or not target.active or target.role != "hospital":
            raise InvalidInput("the recipient is not an active hospital member", code="unknown_recipient")
        if caller.actor != row.custodian:
            mine = self.index.decide(row.patient_ref, caller.actor, row.study_ref, purpose)
            if not mine.allowed:
                raise ConsentDenied(
                    "you may only share studies you hold or are permitted to read", code=mine.reason
                )
        decision = self.index.decide(row.patient_ref, to_member, row.study_ref, purpose)
        if not decision.allowed or decision.consent is None:
            raise ConsentDenied(
                "the patient has not consented to the recipient for this purpose", code=decision.reason
            )
        self.record(
            ctx,
            Outcome.OK,
            consent_id=str(decision.consent.consent_id),
            consent_version=decision.consent.version,
        )
        return {
            "shared": True,
            "study_ref": row.study_ref,
            "recipient": to_member,
            "consent_id": decision.consent.consent_id,
        }

    # ---- history and audit ---------------------------------------------------------------
    def history(self, caller: Caller, ctx: RequestContext, patient_ref: str) -> dict[str, Any]:
        ctx.action, ctx.patient_ref = Action.HISTORY, patient_ref
        anchors = self.audit.anchors()
        confirmed = [a for a in anchors if a.status == "confirmed" and a.kind == "tree"]
        head = max(confirmed, key=lambda a: a.tree_size) if confirmed else None
        entries = []
        patient_events = self.audit.by_patient(patient_ref)
        # One pass over the anchored leaves, then O(log n) per proof (not O(n) per entry).
        tree = (
            TreeLevels(self.audit.leaf_hashes(0, head.tree_size))
            if head is not None and any(ev.seq < head.tree_size for ev in patient_events)
            else None
        )
        for ev in patient_events:
            proof_status = "pending"
            proof: list[str] = []
            if head is not None and tree is not None and ev.seq < head.tree_size:
                path = tree.path(ev.seq)
                ok = verify_inclusion(leaf_hash(ev), ev.seq, head.tree_size, path, head.root)
                proof_status = "included" if ok else "proof_failed"
                proof = ["0x" + p.hex() for p in path]
            elif any(
                a.status == "confirmed" and a.kind == "event" and a.tree_size == ev.seq + 1 for a in anchors
            ):
                proof_status = "included"
            entries.append(
                {
                    "seq": ev.seq,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ev.time_ms / 1000)),
                    "time_ms": ev.time_ms,
                    "who": {"patient": "you", "delegate": "your delegate"}.get(
                        ev.actor_role, self._name(ev.actor)
                    ),
                    "who_id": ev.actor,
                    "action": ev.action,
                    "purpose": ev.purpose,
                    "outcome": ev.outcome,
                    "reason": ev.reason,
                    "break_glass": ev.break_glass,
                    "consent_id": ev.consent_id,
                    "study_ref": ev.study_ref,
                    "record": ev.to_dict(),  # the canonical record: with `proof`, checkable alone
                    "proof": {
                        "status": proof_status,
                        "tree_size": head.tree_size if head else 0,
                        "path": proof,
                    },
                }
            )
        self.record(ctx, Outcome.OK)
        return {
            "patient_ref": patient_ref,
            "events": entries,
            "tree_head": {"tree_size": head.tree_size, "root": "0x" + head.root.hex()} if head else None,
        }

    def verify(self, caller: Caller, ctx: RequestContext) -> Report:
        ctx.action = Action.VERIFY
        self.record(ctx, Outcome.OK)
        self.anchorer.anchor_pending()
        events = list(self.audit.iter_all())
        anchors = read_chain_anchors(self.chain)
        from ledger.verify import read_chain_consents

        consents = read_chain_consents(self.chain, int(self.devnet.data.get("deploy_block", 0)))
        return verify_log(events, anchors, consents)

    def export(self, caller: Caller, ctx: RequestContext, fmt: str) -> tuple[bytes, str]:
        """The audit log in export format `fmt` (see `ledger.exports`) and its media type.

        The EXPORT event itself is recorded and anchored first, so a jsonl export includes it."""
        from ledger.exports import FORMATS, MEDIA_TYPES, render

        ctx.action = Action.EXPORT
        if fmt not in FORMATS:
            raise InvalidInput(f"unknown export format; expected one of {', '.join(FORMATS)}")
        self.record(ctx, Outcome.OK)
        self.anchorer.anchor_pending()
        data = render(
            fmt,
            self.audit,
            read_chain_anchors(self.chain),
            chain_id=self.devnet.chain_id,
            contracts=self.devnet.contracts,
            gateway_id=self.member_id,
        )
        return data, MEDIA_TYPES[fmt]

    def export_events(self, caller: Caller, ctx: RequestContext, from_seq: int = 0) -> list[dict[str, Any]]:
        ctx.action = Action.EXPORT
        if from_seq < 0:
            raise InvalidInput("from_seq must be a non-negative sequence number")
        self.record(ctx, Outcome.OK)
        if from_seq:
            return [ev.to_dict() for ev in self.audit.range(from_seq, max(from_seq, self.audit.size()))]
        return [ev.to_dict() for ev in self.audit.iter_all()]

    # ---- governance and directory ---------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        self.index.ensure_fresh()
        return [
            {"member_id": m.member_id, "name": m.name, "role": m.role, "active": m.active, "key": m.key}
            for m in self.index.members.values()
        ]

    def propose(self, caller: Caller, ctx: RequestContext, body: dict[str, Any]) -> dict[str, Any]:
        ctx.action = Action.GOVERNANCE
        from devnet.manager import ROLE_IDS

        actions = {"add": 0, "remove": 1, "change_role": 2, "rotate_key": 3, "set_threshold": 4}
        action = actions.get(str(body.get("action")))
        role = ROLE_IDS.get(str(body.get("role", "none")))
        if action is None or role is None:
            raise InvalidInput(
                "action must be one of add, remove, change_role, rotate_key, set_threshold; role a known role"
            )
        ctx.counterparty = str(body["member_id"])
        receipt = self._relay(
            "Membership",
            "propose",
            action,
            _b32(body["member_id"]),
            body.get("key") or "0x" + "00" * 20,
            role,
            str(body.get("name", "")),
            int(body.get("value", 0)),
            int(body["deadline"]),
            int(body["nonce"]),
            _b32(body["signature"]),
        )
        c = self.chain.contract("Membership")
        pid = int(
            c.events.ProposalCreated().process_receipt(receipt, errors=DISCARD)[0]["args"]["proposalId"]
        )
        executed = bool(c.events.ProposalExecuted().process_receipt(receipt, errors=DISCARD))
        self.record(ctx, Outcome.OK)
        return {"proposal_id": pid, "executed": executed}

    def approve(
        self, caller: Caller, ctx: RequestContext, proposal_id: int, signature: str
    ) -> dict[str, Any]:
        ctx.action = Action.GOVERNANCE
        receipt = self._relay("Membership", "approve", proposal_id, _b32(signature))
        c = self.chain.contract("Membership")
        executed = bool(c.events.ProposalExecuted().process_receipt(receipt, errors=DISCARD))
        self.record(ctx, Outcome.OK)
        return {"proposal_id": proposal_id, "executed": executed}


_CONSENT_MESSAGES = {
    "no_consent": "the patient has not granted your institution access to this study",
    "consent_expired": "the patient's consent for this access is not in force (expired or not yet valid)",
    "consent_revoked": "the patient revoked the consent for this access",
    "wrong_purpose": "the patient's consent does not cover this purpose of use",
    "wrong_study": "the patient's consent does not cover this study",
}
