"""`medledger audit verify|prove|check|export` and `medledger history` on real parts.

A module-own devnet and gateway build a log through the HTTP API (governance, upload, refused
read, consent, read, break-glass, a later consent); the gateway is then stopped, so the exports
taken afterwards are the chain's current view. Every tamper scenario edits a copy of the export
file, runs the real CLI as a subprocess against the real chain, and must be named with the right
problem code and sequence number; the unmodified export must verify (exit 0).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from eth_account import Account
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from ledger.client import GatewayClient, GatewayError
from ledger.events import AuditEvent, leaf_hash
from ledger.exports.csv import read_csv
from ledger.exports.jsonl import events_of
from ledger.keyfiles import create_key, read_key
from tests.integration.actors import add_member, fresh_instances
from tests.integration.audit_support import (
    OwnStack,
    cli,
    export,
    own_stack,
    read_lines,
    verify,
    wait_anchored,
    write_lines,
)

pytestmark = pytest.mark.integration

PATIENT_ID, ISSUER = "MRN-AUDIT-0815", "AUDIT-TEST-HOSPITAL"
JUSTIFICATION = "Unconscious patient in the ER, priors needed now"


@dataclass
class Env:
    st: OwnStack
    tmp: Path
    current: Path  # the export after everything (current on-chain view)
    stale: Path  # an export taken before the chain advanced
    api: dict[str, bytes]  # GET /audit/export?format=... as the auditor
    history_json: dict[str, Any]
    history_text: str
    patient_key: Path
    a_id: str
    b_id: str
    c1: int
    c2: int
    denied_view: int
    c1_view: int
    break_glass_view: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("audit")
    with own_stack(tmp / "net") as st:
        admins = [GatewayClient(st.url, read_key(Path(a["key_file"])).key) for a in st.data["admins"]]
        keys = {n: Account.create() for n in ("a", "b", "auditor")}
        patient_key = tmp / "patient.key"
        patient_account = create_key(patient_key)
        a_id = add_member(admins, keys["a"].address, "hospital", "Audit Hospital A")
        b_id = add_member(admins, keys["b"].address, "hospital", "Audit Hospital B")
        add_member(admins, keys["auditor"].address, "auditor", "Audit Office")
        a, b, auditor = (GatewayClient(st.url, keys[n].key) for n in ("a", "b", "auditor"))
        patient = GatewayClient(st.url, patient_account.key)
        insts = fresh_instances(PATIENT_ID, ISSUER, ("CT_small.dcm", "MR_small.dcm"))
        status, _ = a.stow([i.data for i in insts])
        assert status == 200
        ref = a.lookup_patient(PATIENT_ID, ISSUER)
        a.enroll(ref, patient_account.address)
        with pytest.raises(GatewayError):
            b.retrieve(insts[0].study, insts[0].series, insts[0].sop, purpose="TREAT")
        c1 = int(patient.grant(ref, b_id, ["TREAT"])["consent_id"])
        assert b.retrieve(insts[0].study, insts[0].series, insts[0].sop, purpose="TREAT") == insts[0].data
        b.retrieve(insts[1].study, insts[1].series, insts[1].sop, purpose="ETREAT", break_glass=JUSTIFICATION)
        time.sleep(3.5)  # the next consent is recorded on-chain clearly after the reads
        c2 = int(patient.grant(ref, b_id, ["TREAT"])["consent_id"])
        wait_anchored(st.url)

        hist = cli("history", "--gateway", st.url, "--key", str(patient_key), "--patient", ref, "--json")
        assert hist.returncode == 0, hist.stderr
        text = cli("history", "--gateway", st.url, "--key", str(patient_key), "--patient", ref)
        assert text.returncode == 0, text.stderr
        wait_anchored(st.url)
        stale = tmp / "stale.jsonl"
        export(st, stale)
        with pytest.raises(GatewayError) as not_auditor:
            b.export("csv")
        assert not_auditor.value.status == 403
        api = {fmt: auditor.export(fmt) for fmt in ("fhir", "dicom-xml", "csv", "jsonl")}
        for c in (*admins, a, b, auditor, patient):
            c.close()

        from ledger.service import stop_service

        stop_service(st.workdir, st.pid)  # flushes the anchorer; nothing changes from here on
        st.pid = 0
        current = tmp / "current.jsonl"
        export(st, current)
        events = events_of(read_lines(current))
        views = [e for e in events if e.action == "VIEW" and e.actor == b_id]
        yield Env(
            st=st,
            tmp=tmp,
            current=current,
            stale=stale,
            api=api,
            history_json=json.loads(hist.stdout),
            history_text=text.stdout,
            patient_key=patient_key,
            a_id=a_id,
            b_id=b_id,
            c1=c1,
            c2=c2,
            denied_view=next(e.seq for e in views if e.outcome == "denied"),
            c1_view=next(e.seq for e in views if e.consent_id == str(c1)),
            break_glass_view=next(e.seq for e in views if e.break_glass),
        )


# ---- the unmodified log ----------------------------------------------------------------------
def test_unmodified_export_verifies(env: Env) -> None:
    lines = read_lines(env.current)
    header = lines[0]
    anchors = [line for line in lines if line["type"] == "anchor"]
    events = [line for line in lines if line["type"] == "event"]
    assert header["tree_size"] == header["log_size"] == len(events) > 20
    assert len(anchors) >= 3 and all(a["consistency"] for a in anchors[1:])
    assert all(e["proof"] for e in events)
    rc, report = verify(env.current, env.st)
    assert rc == 0 and report["ok"], report["problems"]
    assert report["events_checked"] == len(events) and report["anchors_checked"] == len(anchors)
    assert report["break_glass_events"] == [env.break_glass_view]
    assert report["views_checked"] >= 2
    human = cli(
        "audit",
        "verify",
        "--events",
        str(env.current),
        "--rpc",
        env.st.rpc,
        "--contract",
        env.st.access_ledger,
    )
    assert human.returncode == 0 and human.stdout.startswith("verify: OK")


def test_api_jsonl_export_verifies_and_matches_the_cli_export(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "api.jsonl"
    path.write_bytes(env.api["jsonl"])
    rc, report = verify(path, env.st)
    assert rc == 0, report["problems"]
    api_events = events_of(read_lines(path))
    assert api_events == events_of(read_lines(env.current))[: len(api_events)]
    assert api_events[-1].action == "EXPORT"  # the export's own event is in it, anchored


# ---- the tamper suite ------------------------------------------------------------------------
Lines = list[dict[str, Any]]
ANY = -1


def _ev_index(lines: Lines, seq: int) -> int:
    return next(i for i, line in enumerate(lines) if line["type"] == "event" and line["event"]["seq"] == seq)


def _anchors(lines: Lines) -> Lines:
    return [line for line in lines if line["type"] == "anchor"]


def _relabel(line: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The line with its event changed and its `leaf` recomputed (a careful attacker)."""
    out = copy.deepcopy(line)
    out["event"].update(changes)
    out["leaf"] = "0x" + leaf_hash(AuditEvent.from_dict(out["event"])).hex()
    return out


def edit_field(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    i = _ev_index(lines, env.denied_view)
    lines[i]["event"].update(outcome="ok", reason="")
    return lines, {("edited", env.denied_view), ("anchor_mismatch", ANY)}


def delete_event(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    del lines[_ev_index(lines, env.c1_view)]
    return lines, {("gap", env.c1_view), ("anchor_mismatch", ANY)}


def insert_event(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    s = env.c1_view
    i = _ev_index(lines, s)
    for line in lines[i + 1 :]:
        line.update(_relabel(line, seq=line["event"]["seq"] + 1))
    lines.insert(i + 1, _relabel(lines[i], seq=s + 1, request_id="forged-request"))
    return lines, {("bad_proof", s + 1), ("anchor_mismatch", ANY)}


def reorder_two(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    s = env.c1_view
    i = _ev_index(lines, s)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return lines, {("out_of_order", s), ("anchor_mismatch", ANY)}


def drop_last_events(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    x = next(a for a in _anchors(lines) if a["tree_size"] - a["first_seq"] >= 2)
    keep = x["first_seq"] + 1
    lines = [ln for ln in lines if ln["type"] != "event" or ln["event"]["seq"] < keep]
    return lines, {("missing_events", keep)}


def replace_anchor_events(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    y = _anchors(lines)[1]
    expected = {("anchor_mismatch", y["first_seq"])}
    for seq in range(y["first_seq"], y["tree_size"]):
        i = _ev_index(lines, seq)
        lines[i] = _relabel(
            lines[i], action="QUERY", outcome="ok", actor=env.a_id, patient_ref="", request_id=f"forged-{seq}"
        )
        expected.add(("bad_proof", seq))
    return lines, expected


def forge_proof(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    i = _ev_index(lines, env.c1_view)
    lines[i]["proof"]["path"][0] = "0x" + "00" * 32
    return lines, {("bad_proof", env.c1_view)}


def view_without_consent(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    i = _ev_index(lines, env.c1_view)
    lines[i] = _relabel(lines[i], consent_id="", consent_version=0)
    return lines, {("view_without_consent", env.c1_view), ("bad_proof", env.c1_view)}


def consent_backdated(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    """The read names a consent that was recorded on-chain only after the read."""
    i = _ev_index(lines, env.c1_view)
    lines[i] = _relabel(lines[i], consent_id=str(env.c2))
    return lines, {("consent_granted_later", env.c1_view), ("anchor_mismatch", ANY)}


def hide_break_glass(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    i = _ev_index(lines, env.break_glass_view)
    lines[i] = _relabel(lines[i], break_glass=False, justification_commitment="")
    return lines, {("view_without_consent", env.break_glass_view), ("anchor_mismatch", ANY)}


def time_backwards(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    s = env.c1_view
    prev = lines[_ev_index(lines, s - 1)]["event"]["time_ms"]
    i = _ev_index(lines, s)
    lines[i] = _relabel(lines[i], time_ms=prev - 60_000)
    return lines, {("time_backwards", s), ("anchor_mismatch", ANY)}


def duplicate_seq(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    i = _ev_index(lines, env.c1_view)
    lines.insert(i + 1, copy.deepcopy(lines[i]))
    return lines, {("duplicate", env.c1_view)}


def anchor_without_events(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    last = _anchors(lines)[-1]
    lines = [ln for ln in lines if ln["type"] != "event" or ln["event"]["seq"] < last["first_seq"]]
    return lines, {("anchor_without_events", last["first_seq"])}


def append_unanchored(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    last = max(i for i, ln in enumerate(lines) if ln["type"] == "event")
    n = lines[last]["event"]["seq"] + 1
    forged = _relabel(lines[last], seq=n, request_id="appended")
    forged["proof"] = None
    lines.append(forged)
    return lines, {("unanchored", n)}


def forge_consistency_proof(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    last = _anchors(lines)[-1]
    last["consistency"]["path"][0] = "0x" + "11" * 32
    return lines, {("bad_consistency_proof", last["first_seq"])}


def forge_anchor(env: Env, lines: Lines) -> tuple[Lines, set[tuple[str, int]]]:
    a = _anchors(lines)[1]
    a["root"] = "0x" + "22" * 32
    return lines, {("anchor_not_on_chain", a["first_seq"])}


SCENARIOS: list[Callable[[Env, Lines], tuple[Lines, set[tuple[str, int]]]]] = [
    edit_field,
    delete_event,
    insert_event,
    reorder_two,
    drop_last_events,
    replace_anchor_events,
    forge_proof,
    view_without_consent,
    consent_backdated,
    hide_break_glass,
    time_backwards,
    duplicate_seq,
    anchor_without_events,
    append_unanchored,
    forge_consistency_proof,
    forge_anchor,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_tampering_is_detected_and_named(
    env: Env, tmp_path: Path, scenario: Callable[[Env, Lines], tuple[Lines, set[tuple[str, int]]]]
) -> None:
    lines, expected = scenario(env, read_lines(env.current))
    path = write_lines(tmp_path / f"{scenario.__name__}.jsonl", lines)
    rc, report = verify(path, env.st)
    assert rc == 1 and not report["ok"]
    found = {(p["code"], p["seq"]) for p in report["problems"]}
    for code, seq in expected:
        if seq == ANY:
            assert any(c == code for c, _ in found), (code, found)
        else:
            assert (code, seq) in found, (code, seq, found)
    if scenario in (forge_proof, forge_consistency_proof, forge_anchor, append_unanchored):
        assert {c for c, _ in found} <= {c for c, _ in expected} | {"bad_proof"}, found


def test_an_old_export_is_stale(env: Env) -> None:
    old = read_lines(env.stale)[0]
    rc, report = verify(env.stale, env.st)
    assert rc == 1
    assert ("stale_export", old["tree_size"]) in {(p["code"], p["seq"]) for p in report["problems"]}


# ---- one record, its proof, a chain endpoint ---------------------------------------------------
def test_prove_and_check_round_trip(env: Env, tmp_path: Path) -> None:
    proof = tmp_path / "proof.json"
    r = cli("audit", "prove", str(env.c1_view), "--workdir", str(env.st.workdir), "--out", str(proof))
    assert r.returncode == 0, r.stderr
    p = json.loads(proof.read_text())
    assert p["event"]["seq"] == env.c1_view and p["path"]
    ok = cli("audit", "check", str(proof), "--rpc", env.st.rpc, "--contract", env.st.access_ledger, "--json")
    assert ok.returncode == 0, ok.stdout
    assert json.loads(ok.stdout)["ok"]

    p["event"]["purpose"] = "HRESCH"  # the record no longer says what happened
    bad = tmp_path / "modified.json"
    bad.write_text(json.dumps(p))
    r = cli("audit", "check", str(bad), "--rpc", env.st.rpc, "--contract", env.st.access_ledger)
    assert r.returncode == 1 and not json.loads(r.stdout)["ok"]
    p["event"]["purpose"] = "TREAT"
    p["path"][-1] = "0x" + "33" * 32  # nor is a forged path accepted
    bad.write_text(json.dumps(p))
    assert (
        cli("audit", "check", str(bad), "--rpc", env.st.rpc, "--contract", env.st.access_ledger).returncode
        == 1
    )
    missing = cli("audit", "prove", "100000", "--workdir", str(env.st.workdir))
    assert missing.returncode == 1 and "no event" in missing.stderr


def test_patient_checks_a_history_entry_alone(env: Env, tmp_path: Path) -> None:
    entries = env.history_json["events"]
    view = next(e for e in entries if e["seq"] == env.c1_view)
    assert (
        view["who"] == "Audit Hospital B"
        and view["purpose"] == "TREAT"
        and view["proof"]["status"] == "included"
    )
    assert any(e["break_glass"] for e in entries)
    assert f"#{env.c1_view}" in env.history_text and "BREAK-GLASS" in env.history_text
    entry = tmp_path / "entry.json"
    entry.write_text(json.dumps(view))
    args = ("--rpc", env.st.rpc, "--contract", env.st.access_ledger)
    assert cli("audit", "check", str(entry), *args).returncode == 0
    view["record"]["actor"] = env.a_id  # claim another hospital read it
    entry.write_text(json.dumps(view))
    assert cli("audit", "check", str(entry), *args).returncode == 1


# ---- the reporting formats -------------------------------------------------------------------
def test_api_and_cli_reporting_exports(env: Env, tmp_path: Path) -> None:
    events = events_of(read_lines(env.current))
    fhir = env.api["fhir"].decode().splitlines()
    assert 15 < len(fhir) < len(events)  # taken through the API before the last few events
    resources = [FhirAuditEvent.model_validate_json(line) for line in fhir]
    assert [r.id for r in resources] == [f"medledger-{i}" for i in range(len(resources))]
    refused = next(r for r in resources if r.id == f"medledger-{env.denied_view}")
    assert refused.outcome == "4" and refused.outcomeDesc == "no_consent"

    root = ET.fromstring(env.api["dicom-xml"])
    messages = root.findall("AuditMessage")
    assert len(messages) == len(resources) + 1  # each API export records its EXPORT event first
    alert = messages[env.denied_view].find("EventIdentification/EventID")
    accessed = messages[env.c1_view].find("EventIdentification/EventID")
    assert alert is not None and alert.get("csd-code") == "110113"
    assert accessed is not None and accessed.get("csd-code") == "110103"

    assert read_csv(env.api["csv"].decode()) == events[: len(resources) + 2]
    out = tmp_path / "log.csv"
    export(env.st, out, "--format", "csv")
    assert read_csv(out.read_text()) == events
    for fmt in ("fhir", "dicom-xml"):
        export(env.st, tmp_path / f"log.{fmt}", "--format", fmt)
    assert ET.parse(tmp_path / "log.dicom-xml").getroot().tag == "AuditMessages"

    for data in env.api.values():  # pseudonymous refs only: no patient ID, name or UID
        assert PATIENT_ID.encode() not in data and b"Test^Authz" not in data and b"Authz" not in data
