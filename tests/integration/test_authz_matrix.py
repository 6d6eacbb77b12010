"""The authorization matrix: every endpoint x every role x every way a request can be wrong.

Each case sends one real request to the detached gateway and checks the status, the reason
code, and that the auditor's GET /audit/events holds an event with that request's id and the
same reason (refusals before the caller is known included). The rows come from a table keyed
by (method, path); `test_every_endpoint_has_a_matrix_row` compares it with the app's routes,
so an endpoint added without a row fails the suite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from eth_account import Account

from api.app import create_app
from ledger.client import GatewayClient
from ledger.reqsig import domain_separator
from tests.integration.actors import (
    AuditReader,
    Instance,
    RawSender,
    add_member,
    admin_clients,
    fresh_instances,
    garbage,
    instance_path,
    jbody,
    remove_member,
    tamper,
    wait_until,
)

pytestmark = pytest.mark.integration

ISSUER = "AUTHZ-MATRIX-ISSUER"
DICOM_ACCEPT = 'multipart/related; type="application/dicom"'

PUBLIC, MEMBER, PATIENT, DIRECTORY = "public", "member", "patient", "directory"
MEMBER_ROLES = ("hospital", "auditor", "admin")
NON_MEMBERS = ("patient", "delegate", "other_patient", "outsider", "removed")
ROLES = MEMBER_ROLES + NON_MEMBERS


@dataclass(frozen=True)
class Row:
    kind: str
    roles: tuple[str, ...] = ()  # who may call it (member routes: member roles; patient routes: patient)
    records_success: bool = True  # whether an allowed call leaves an "ok" audit event


MATRIX: dict[tuple[str, str], Row] = {
    ("GET", "/health"): Row(PUBLIC),
    ("GET", "/info"): Row(PUBLIC),
    ("GET", "/openapi.json"): Row(PUBLIC),
    ("GET", "/docs"): Row(PUBLIC),
    ("GET", "/docs/oauth2-redirect"): Row(PUBLIC),
    ("GET", "/redoc"): Row(PUBLIC),
    ("POST", "/dicomweb/studies"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{sop}"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/metadata"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}/metadata"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}"): Row(
        MEMBER, ("hospital",)
    ),
    ("GET", "/dicomweb/studies"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/series"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/instances"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/instances"): Row(MEMBER, ("hospital",)),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances"): Row(MEMBER, ("hospital",)),
    ("POST", "/patients/lookup"): Row(MEMBER, ("hospital",)),
    ("POST", "/patients/{patient_ref}/enrollment"): Row(MEMBER, ("hospital",)),
    ("GET", "/patients/{patient_ref}"): Row(PATIENT, ("patient", "delegate")),
    ("GET", "/patients/{patient_ref}/history"): Row(PATIENT, ("patient", "delegate")),
    ("POST", "/patients/{patient_ref}/consents"): Row(PATIENT, ("patient", "delegate")),
    ("POST", "/patients/{patient_ref}/consents/{consent_id}/revoke"): Row(PATIENT, ("patient", "delegate")),
    ("POST", "/patients/{patient_ref}/key-rotation"): Row(PATIENT, ("patient", "delegate")),
    ("POST", "/patients/{patient_ref}/delegates"): Row(PATIENT, ("patient", "delegate")),
    ("POST", "/shares"): Row(MEMBER, ("hospital",)),
    ("GET", "/audit/verify"): Row(MEMBER, ("auditor",)),
    ("GET", "/audit/events"): Row(MEMBER, ("auditor",)),
    ("GET", "/audit/export"): Row(MEMBER, ("auditor",)),
    ("GET", "/members"): Row(DIRECTORY, (*MEMBER_ROLES, "patient", "delegate", "other_patient"), False),
    ("POST", "/governance/proposals"): Row(MEMBER, ("admin",)),
    ("POST", "/governance/proposals/{proposal_id}/approvals"): Row(MEMBER, ("admin",)),
    ("GET", "/governance/nonces/{address}"): Row(MEMBER, ("admin",), False),
}
SIGNED = [k for k, row in MATRIX.items() if row.kind != PUBLIC]


@dataclass
class World:
    url: str
    keys: dict[str, bytes]  # role -> private key
    ids: dict[str, str]  # hospital_a / hospital_b / hospital_c -> member id
    b: GatewayClient
    c: GatewayClient
    patient: GatewayClient
    auditor: GatewayClient
    raw: RawSender
    audit: AuditReader
    patient_ref: str
    patient_id: str
    instances: list[Instance]
    study_refs: list[str]
    consents: dict[str, int]
    admin_address: str
    chain_id: int
    contracts: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(stack) -> World:  # type: ignore[no-untyped-def]
    admins = admin_clients(stack)
    accts = {
        n: Account.create() for n in ("a", "b", "c", "auditor", "removed", "patient", "other", "delegate")
    }
    accts["outsider"] = Account.create()
    ids = {
        "hospital_a": add_member(admins, accts["a"].address, "hospital", "Matrix Hospital A"),
        "hospital_b": add_member(admins, accts["b"].address, "hospital", "Matrix Hospital B"),
        "hospital_c": add_member(admins, accts["c"].address, "hospital", "Matrix Hospital C"),
    }
    add_member(admins, accts["auditor"].address, "auditor", "Matrix Auditor")
    removed_id = add_member(admins, accts["removed"].address, "hospital", "Matrix Removed Hospital")
    remove_member(admins, removed_id)

    a = GatewayClient(stack.url, accts["a"].key)
    patient_id = f"AUTHZ-{time.time_ns()}"
    instances = fresh_instances(patient_id, ISSUER)
    status, _ = a.stow([i.data for i in instances])
    assert status == 200
    ref = a.lookup_patient(patient_id, ISSUER)
    a.enroll(ref, accts["patient"].address)
    other_ref = a.lookup_patient(patient_id + "-OTHER", ISSUER)
    a.enroll(other_ref, accts["other"].address)

    patient = GatewayClient(stack.url, accts["patient"].key)
    by_uid = {s["study_instance_uid"]: s["study_ref"] for s in patient.patient(ref)["studies"]}
    study_refs = [by_uid[i.study] for i in instances]
    # study 3: a consent that expires in a few seconds (granted first, so the wait overlaps the rest)
    now = int(time.time())
    expiring = patient.grant(ref, ids["hospital_b"], ["TREAT"], study_ref=study_refs[3], not_after=now + 3)
    c1 = patient.grant(ref, ids["hospital_b"], ["TREAT"], study_ref=study_refs[0])  # study 0: in force
    c3 = patient.grant(ref, ids["hospital_b"], ["TREAT"], study_ref=study_refs[2])  # study 2: revoked
    patient.revoke(ref, int(c3["consent_id"]))
    patient.set_delegate(ref, accts["delegate"].address, now + 3600)
    # study 1: no consent for it at all (B holds TREAT consents for other studies: wrong_study)

    auditor = GatewayClient(stack.url, accts["auditor"].key)
    keys = {
        "hospital": accts["a"].key,
        "auditor": accts["auditor"].key,
        "admin": admins[0]._key,
        "patient": accts["patient"].key,
        "delegate": accts["delegate"].key,
        "other_patient": accts["other"].key,
        "outsider": accts["outsider"].key,
        "removed": accts["removed"].key,
    }
    w = World(
        url=stack.url,
        keys={k: bytes(v) for k, v in keys.items()},
        ids=ids,
        b=GatewayClient(stack.url, accts["b"].key),
        c=GatewayClient(stack.url, accts["c"].key),
        patient=patient,
        auditor=auditor,
        raw=RawSender(stack.url, a.domain),
        audit=AuditReader(auditor),
        patient_ref=ref,
        patient_id=patient_id,
        instances=instances,
        study_refs=study_refs,
        consents={"in_force": int(c1["consent_id"]), "expiring": int(expiring["consent_id"])},
        admin_address=admins[0].address,
        chain_id=a.chain_id,
        contracts=a.contracts,
    )
    wait_until(now + 4.5)  # the expiring consent is now past its notAfter
    return w


# ---- the probe: one well-formed request per endpoint, as its intended caller would send it -----
@dataclass(frozen=True)
class Probe:
    path: str
    body: bytes
    headers: dict[str, str]
    status: int  # what the intended caller gets
    code: str  # its audit reason ("" when ok)
    query: str = ""


def probe(route: tuple[str, str], w: World) -> Probe:
    method, template = route
    i0 = w.instances[0]
    ref = w.patient_ref
    read = {"Accept": DICOM_ACCEPT, "X-MedLedger-Purpose": "TREAT"}
    meta = {"Accept": "application/dicom+json", "X-MedLedger-Purpose": "TREAT"}
    series = f"/dicomweb/studies/{i0.study}/series/{i0.series}"
    q = f"?StudyInstanceUID={i0.study}"
    json_h = {"Content-Type": "application/json"}
    bad_input = (jbody({}), json_h, 400, "invalid_input")
    table: dict[str, tuple[str, bytes, dict[str, str], int, str]] = {
        "/health": ("/health", b"", {}, 200, ""),
        "/info": ("/info", b"", {}, 200, ""),
        "/openapi.json": ("/openapi.json", b"", {}, 200, ""),
        "/docs": ("/docs", b"", {}, 200, ""),
        "/docs/oauth2-redirect": ("/docs/oauth2-redirect", b"", {}, 200, ""),
        "/redoc": ("/redoc", b"", {}, 200, ""),
        # STOW with a JSON body: past authentication and role, refused as the wrong media type
        "POST /dicomweb/studies": (
            "/dicomweb/studies",
            b"{}",
            json_h,
            415,
            "unsupported_media_type",
        ),
        "/dicomweb/studies/{study}/series/{series}/instances/{sop}": (instance_path(i0), b"", read, 200, ""),
        "/dicomweb/studies/{study}": (f"/dicomweb/studies/{i0.study}", b"", read, 200, ""),
        "/dicomweb/studies/{study}/series/{series}": (series, b"", read, 200, ""),
        "/dicomweb/studies/{study}/metadata": (f"/dicomweb/studies/{i0.study}/metadata", b"", meta, 200, ""),
        "/dicomweb/studies/{study}/series/{series}/metadata": (f"{series}/metadata", b"", meta, 200, ""),
        "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata": (
            f"{instance_path(i0)}/metadata",
            b"",
            meta,
            200,
            "",
        ),
        # a malformed tag: past authentication and role, refused as bad input
        "/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}": (
            f"{instance_path(i0)}/bulkdata/nothex!!",
            b"",
            read,
            400,
            "invalid_input",
        ),
        "/dicomweb/studies": (f"/dicomweb/studies{q}", b"", meta, 200, ""),
        "/dicomweb/series": (f"/dicomweb/series{q}", b"", meta, 200, ""),
        "/dicomweb/instances": (f"/dicomweb/instances{q}", b"", meta, 200, ""),
        "/dicomweb/studies/{study}/series": (f"/dicomweb/studies/{i0.study}/series", b"", meta, 200, ""),
        "/dicomweb/studies/{study}/instances": (
            f"/dicomweb/studies/{i0.study}/instances",
            b"",
            meta,
            200,
            "",
        ),
        "/dicomweb/studies/{study}/series/{series}/instances": (f"{series}/instances", b"", meta, 200, ""),
        "/patients/lookup": (
            "/patients/lookup",
            jbody({"patient_id": w.patient_id, "issuer": ISSUER}),
            json_h,
            200,
            "",
        ),
        "/patients/{patient_ref}/enrollment": (f"/patients/{ref}/enrollment", *bad_input),
        "/patients/{patient_ref}": (f"/patients/{ref}", b"", {}, 200, ""),
        "/patients/{patient_ref}/history": (f"/patients/{ref}/history", b"", {}, 200, ""),
        "/patients/{patient_ref}/consents": (f"/patients/{ref}/consents", *bad_input),
        "/patients/{patient_ref}/consents/{consent_id}/revoke": (
            f"/patients/{ref}/consents/{w.consents['in_force']}/revoke",
            *bad_input,
        ),
        "/patients/{patient_ref}/key-rotation": (f"/patients/{ref}/key-rotation", *bad_input),
        "/patients/{patient_ref}/delegates": (f"/patients/{ref}/delegates", *bad_input),
        "/shares": ("/shares", *bad_input),
        "/audit/verify": ("/audit/verify", b"", {}, 200, ""),
        "/audit/events": ("/audit/events", b"", {}, 200, ""),
        # an unknown format: past authentication and role, refused as bad input (the query is signed)
        "/audit/export": ("/audit/export?format=no-such-format", b"", {}, 400, "invalid_input"),
        "/members": ("/members", b"", {}, 200, ""),
        "/governance/proposals": ("/governance/proposals", *bad_input),
        "/governance/proposals/{proposal_id}/approvals": ("/governance/proposals/1/approvals", *bad_input),
        "/governance/nonces/{address}": (f"/governance/nonces/{w.admin_address}", b"", {}, 200, ""),
    }
    path, body, headers, status, code = table.get(f"{method} {template}") or table[template]
    path, _, query = path.partition("?")
    return Probe(path, body, headers, status, code, query)


def refusal_for(row: Row, role: str) -> tuple[int, str]:
    """What `role` gets from an endpoint it may not call."""
    if row.kind == PATIENT:
        return 403, "not_patient"
    if row.kind == MEMBER and role in MEMBER_ROLES:
        return 403, "wrong_role"
    return 403, "not_a_member"


def intended_role(route: tuple[str, str]) -> str:
    return MATRIX[route].roles[0]


def check(w: World, r: Any, status: int, code: str, row: Row | None) -> None:
    """Status and reason as expected, and the audit log holds this request with the same reason."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    rid = r.headers.get("x-request-id", "")
    if status >= 400:
        body = r.json()
        assert body["error"] == code, body
        assert body["request_id"] == rid
        events = w.audit.events_of(rid)
        assert events, f"refusal {code} (request {rid}) is not in the audit log"
        assert all(e["reason"] == code for e in events), events
        want = "denied" if status in (401, 403) else "rejected"
        assert all(e["outcome"] == want for e in events), events
    elif row is not None and row.kind != PUBLIC and row.records_success:
        events = w.audit.events_of(rid)
        assert events and all(e["outcome"] == "ok" for e in events), events


def _id(route: tuple[str, str]) -> str:
    return f"{route[0]} {route[1]}"


# ---- 0. the table covers every endpoint -----------------------------------------------------------
def test_every_endpoint_has_a_matrix_row(stack) -> None:  # type: ignore[no-untyped-def]
    from fastapi.routing import iter_route_contexts

    app = create_app(stack.workdir)
    # iter_route_contexts flattens included routers (app.routes holds them as one entry each)
    routes = {
        (method, str(route.path))
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    assert routes, "no routes found"
    missing = sorted(routes - set(MATRIX))
    stale = sorted(set(MATRIX) - routes)
    assert not missing, f"endpoints without an authorization-matrix row: {missing}"
    assert not stale, f"matrix rows for endpoints that do not exist: {stale}"


# ---- 1. every signed endpoint x every role -----------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", SIGNED, ids=_id)
def test_role(world: World, route: tuple[str, str], role: str) -> None:
    row = MATRIX[route]
    p = probe(route, world)
    method = route[0]
    headers = {**p.headers, **world.raw.headers(world.keys[role], method, p.path, p.body, query=p.query)}
    r = world.raw.send(method, p.path, p.body, headers, query=p.query)
    if role in row.roles:
        check(world, r, p.status, p.code, row)
    else:
        check(world, r, *refusal_for(row, role), row)


@pytest.mark.parametrize("route", [k for k, row in MATRIX.items() if row.kind == PUBLIC], ids=_id)
def test_public_endpoints_need_no_signature(world: World, route: tuple[str, str]) -> None:
    p = probe(route, world)
    check(world, world.raw.send(route[0], p.path, b"", {}), 200, "", MATRIX[route])


# ---- 2. every signed endpoint x every way the signature can be wrong -----------------------------
AUTH_CASES = (
    "no_signature",
    "garbage_signature",
    "tampered",
    "other_chain",
    "other_deployment",
    "impersonation",
    "tampered_without_key_header",
    "expired",
    "future",
    "replayed",
)


@pytest.mark.parametrize("case", AUTH_CASES)
@pytest.mark.parametrize("route", SIGNED, ids=_id)
def test_authentication(world: World, route: tuple[str, str], case: str) -> None:
    row = MATRIX[route]
    p = probe(route, world)
    method = route[0]
    role = intended_role(route)
    key = world.keys[role]
    now = int(time.time())

    def signed(**kw: Any) -> dict[str, str]:
        return {**p.headers, **world.raw.headers(key, method, p.path, p.body, query=p.query, **kw)}

    def send(headers: dict[str, str]) -> Any:
        return world.raw.send(method, p.path, p.body, headers, query=p.query)

    if case == "no_signature":
        check(world, send(dict(p.headers)), 401, "missing_signature", row)
    elif case == "garbage_signature":
        check(world, send(garbage(signed())), 401, "bad_signature", row)
    elif case == "tampered":
        check(world, send(tamper(signed())), 401, "bad_signature", row)
    elif case == "other_chain":
        other = domain_separator(world.chain_id + 1, world.contracts["Membership"])
        check(world, send(signed(domain=other)), 401, "bad_signature", row)
    elif case == "other_deployment":
        other = domain_separator(world.chain_id, world.contracts["Consent"])
        check(world, send(signed(domain=other)), 401, "bad_signature", row)
    elif case == "impersonation":  # an outsider's signature, claiming the intended caller's key
        from ledger.reqsig import address_of

        h = {
            **p.headers,
            **world.raw.headers(
                world.keys["outsider"], method, p.path, p.body, query=p.query, claim=address_of(key)
            ),
        }
        check(world, send(h), 401, "bad_signature", row)
    elif case == "tampered_without_key_header":
        # without X-MedLedger-Key a changed request recovers to some unknown key: refused as such
        check(world, send(tamper(signed(claim=None))), *refusal_for(row, "outsider"), row)
    elif case == "expired":
        check(world, send(signed(timestamp=now - 301 - 5)), 401, "request_expired", row)
    elif case == "future":
        check(world, send(signed(timestamp=now + 301 + 5)), 401, "request_expired", row)
    elif case == "replayed":
        h = signed()
        check(world, send(h), p.status, p.code, row)
        check(world, send(h), 401, "replay", row)
    else:  # pragma: no cover
        raise AssertionError(case)


# ---- 3. consent-governed endpoints x every consent state ------------------------------------------
# Each consent state, as (caller, study index, purpose, expected status, reason): B holds TREAT
# consents for study 0 (in force), 2 (revoked) and 3 (expired), none for study 1; C holds none.
CONSENT_STATES = [
    ("b", 0, "TREAT", 200, ""),
    ("b", 1, "TREAT", 403, "wrong_study"),
    ("b", 2, "TREAT", 403, "consent_revoked"),
    ("b", 3, "TREAT", 403, "consent_expired"),
    ("b", 0, "HRESCH", 403, "wrong_purpose"),
    ("c", 0, "TREAT", 403, "no_consent"),
]
# the consent-governed reads (WADO-RS: bytes and metadata, at each level), and sharing
READS = {
    "instance": lambda i: instance_path(i),
    "series": lambda i: f"/dicomweb/studies/{i.study}/series/{i.series}",
    "study": lambda i: f"/dicomweb/studies/{i.study}",
    "instance_metadata": lambda i: f"{instance_path(i)}/metadata",
    "series_metadata": lambda i: f"/dicomweb/studies/{i.study}/series/{i.series}/metadata",
    "study_metadata": lambda i: f"/dicomweb/studies/{i.study}/metadata",
}
CONSENT_CASES = [(endpoint, *state) for endpoint in (*READS, "share") for state in CONSENT_STATES] + [
    # a share by a non-custodian: allowed only where its own consent allows
    ("share_by_b", "c", 2, "TREAT", 403, "consent_revoked"),
    ("share_by_b", "c", 3, "TREAT", 403, "consent_expired"),
]


@pytest.mark.parametrize(
    ("endpoint", "who", "study", "purpose", "status", "code"),
    CONSENT_CASES,
    ids=[f"{e}-{w}-s{s}-{p}-{c or 'ok'}" for e, w, s, p, _, c in CONSENT_CASES],
)
def test_consent(
    world: World, endpoint: str, who: str, study: int, purpose: str, status: int, code: str
) -> None:
    inst = world.instances[study]
    accept = "application/dicom+json" if endpoint.endswith("metadata") else DICOM_ACCEPT
    headers = {"Accept": accept, "X-MedLedger-Purpose": purpose}
    if endpoint in READS:
        client = world.b if who == "b" else world.c
        r = client.http.get(READS[endpoint](inst), headers=headers)
        row = MATRIX[("GET", "/dicomweb/studies/{study}")]
    else:
        key = world.keys["hospital"] if endpoint == "share" else world.b._key
        body = jbody(
            {
                "study_instance_uid": inst.study,
                "recipient": world.ids["hospital_b" if who == "b" else "hospital_c"],
                "purpose": purpose,
            }
        )
        h = {"Content-Type": "application/json", **world.raw.headers(key, "POST", "/shares", body)}
        r = world.raw.send("POST", "/shares", body, h)
        row = MATRIX[("POST", "/shares")]
    check(world, r, status, code, row)
    events = world.audit.events_of(r.headers["x-request-id"])
    if status == 200:
        # every allowed access names the consent (id and version) that allowed it
        assert events and all(
            e["consent_id"] == str(world.consents["in_force"]) and e["consent_version"] == 1 for e in events
        ), events
    if endpoint in READS:
        assert events and all(
            e["action"] == "VIEW"
            and e["study_ref"] == world.study_refs[study]
            and e["actor"] == world.ids["hospital_b" if who == "b" else "hospital_c"]
            for e in events
        ), events


@pytest.mark.parametrize(("who", "study", "purpose", "status", "code"), CONSENT_STATES)
def test_qido_shows_only_what_consent_allows(
    world: World, who: str, study: int, purpose: str, status: int, code: str
) -> None:
    client = world.b if who == "b" else world.c
    inst = world.instances[study]
    headers = {"Accept": "application/dicom+json", "X-MedLedger-Purpose": purpose}
    r = client.http.get("/dicomweb/studies", params={"StudyInstanceUID": inst.study}, headers=headers)
    # a search refuses nothing: it leaves out what the caller may not see
    assert r.status_code == (200 if status == 200 else 204), r.text[:300]
    if status == 200:
        assert [s["0020000D"]["Value"][0] for s in r.json()] == [inst.study]
    (ev,) = world.audit.events_of(r.headers["x-request-id"])
    assert ev["action"] == "QUERY" and ev["outcome"] == "ok"
    assert ev["reason"] == ("matches:1" if status == 200 else "matches:0")


def test_break_glass_without_consent_is_allowed_and_flagged(world: World) -> None:
    inst = world.instances[1]
    headers = {
        "Accept": DICOM_ACCEPT,
        "X-MedLedger-Purpose": "ETREAT",
        "X-MedLedger-Break-Glass": "Unconscious patient in ED; prior imaging needed now.",
    }
    r = world.c.http.get(instance_path(inst), headers=headers)
    check(world, r, 200, "", None)
    (ev,) = world.audit.events_of(r.headers["x-request-id"])
    assert ev["action"] == "VIEW" and ev["outcome"] == "ok" and ev["break_glass"] is True
    assert ev["consent_id"] == "" and ev["justification_commitment"].startswith("0x")


# ---- 4. refusals of requests that match no endpoint are recorded too --------------------------------
@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/no/such/endpoint", 404, "unknown_endpoint"),
        ("DELETE", "/members", 405, "method_not_allowed"),
    ],
)
def test_unrouted_requests_are_refused_and_recorded(
    world: World, method: str, path: str, status: int, code: str
) -> None:
    r = world.raw.send(method, path, b"", {})
    check(world, r, status, code, None)
