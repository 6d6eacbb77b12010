"""The `medledger` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ledger.errors import MedLedgerError

DEFAULT_WORKDIR = Path(".devnet")


def _workdir(args: argparse.Namespace) -> Path:
    return Path(args.workdir).resolve()


def cmd_devnet(args: argparse.Namespace) -> int:
    from devnet import manager

    wd = _workdir(args)
    if args.action == "up":
        net = manager.up(wd)
        print(
            json.dumps({k: net.data[k] for k in ("rpc_url", "chain_id", "ipfs_api", "contracts")}, indent=2)
        )
    elif args.action == "down":
        if not manager.devnet_file(wd).exists():
            print(f"medledger: no devnet in {wd} (no devnet.json); nothing to stop", file=sys.stderr)
            return 1
        stopped = manager.down(wd)
        print(json.dumps({"stopped": stopped}))
    else:
        st = manager.status(wd)
        print(json.dumps(st, indent=2))
        return 0 if st.get("deployed") and st["anvil"]["running"] and st["ipfs"]["running"] else 3
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ledger.gateway import GatewayConfig
    from ledger.service import serve

    config = GatewayConfig(
        anchor_mode=args.anchor_mode,
        anchor_delay=args.anchor_delay,
        anchor_batch=args.anchor_batch,
        max_staleness=args.max_staleness,
        poll_interval=args.poll_interval,
    )
    serve(_workdir(args), host=args.host, port=args.port, config=config)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ledger.demo import run

    def say(msg: str) -> None:
        if not args.json:
            print(msg, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)

    result = run(_workdir(args), say=say)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"\nMedLedger demo: {len(result['uploaded'])} uploaded, {result['reads_allowed']} reads allowed, "
            f"{result['reads_denied']} refused, {result['events']} audit events in {result['anchors']} on-chain anchors, "
            f"verify ok={result['verify']['ok']}"
        )
    return 0 if result["verify"]["ok"] else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from ledger import audit_cli

    return audit_cli.run(args)


def cmd_history(args: argparse.Namespace) -> int:
    from ledger.history_cli import run

    return run(args)


def cmd_edge(args: argparse.Namespace) -> int:
    from ledger.edge import run_edge

    run_edge(
        args.gateway,
        args.key,
        listen=args.listen,
        purpose=args.purpose,
        dimse_config=args.dimse_config,
        dimse_port=args.dimse_port,
        dimse_host=args.dimse_host,
        allow_remote=args.allow_remote,
        say=lambda msg: print(msg, flush=True),
    )
    return 0


def _strict_dicom_check(path: Path) -> str | None:
    """The gateway's ingest validation (ledger.dicom): None if valid, else the reason code."""
    from ledger.dicom import parse_instance

    try:
        parse_instance(path.read_bytes())
    except MedLedgerError as err:
        return err.code
    return None


def cmd_deid(args: argparse.Namespace) -> int:
    from ledger.deid import DeidContext, DeidError, DeidOption, deidentify_file, deidentify_tree

    options = DeidOption.NONE
    for name in args.option or []:
        key = name.upper().replace("-", "_")
        if key not in DeidOption.__members__ or key == "NONE":
            valid = ", ".join(n.lower().replace("_", "-") for n in DeidOption.__members__ if n != "NONE")
            print(f"medledger: unknown de-identification option {name!r}; valid: {valid}", file=sys.stderr)
            return 2
        options |= DeidOption[key]
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        print(f"medledger: {src} does not exist", file=sys.stderr)
        return 2
    try:
        if src.is_file():
            reason = _strict_dicom_check(src)
            if reason is not None:
                print(f"medledger: {src} is not a valid DICOM object: {reason}", file=sys.stderr)
                return 1
            out = dst / src.name if dst.is_dir() else dst
            deidentify_file(src, out, options, DeidContext())
            print(json.dumps({"written": [str(out)], "skipped": []}))
            return 0
        report = deidentify_tree(src, dst, options, validate=_strict_dicom_check)
    except (DeidError, ValueError) as err:
        print(f"medledger: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "written": len(report.written),
                "studies": report.studies,
                "patients": report.patients,
                "skipped": [{"file": str(p), "reason": r} for p, r in report.skipped],
            },
            indent=2,
        )
    )
    return 0 if report.written or not report.skipped else 1


def cmd_scan_phi(args: argparse.Namespace) -> int:
    """Scan every block, transaction, log and IPFS block (and the workdir's files) for PHI."""
    import asyncio
    import hashlib

    import pydicom
    from eth_utils import keccak

    from devnet.manager import load
    from ledger.demo import demo_instances
    from ledger.phi_scan import scan_chain, scan_files, scan_ipfs

    wd = _workdir(args)
    net = load(wd)
    values: set[str] = set(args.value or [])
    for f in args.dicom or []:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        values |= {str(ds.get(k, "")) for k in ("PatientName", "PatientID")}
    if not args.dicom and not args.value:
        for _, data, orig in demo_instances():
            from io import BytesIO

            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            values |= {str(ds.PatientName), str(ds.PatientID), *orig.values()}
    values = {v for v in values if len(v) >= 3}
    needles: set[bytes] = set()
    for v in values:
        b = v.encode()
        needles |= {
            b,
            b.hex().encode(),
            hashlib.sha256(b).hexdigest().encode(),
            keccak(b).hex().encode(),
            hashlib.sha256(b).digest(),
            keccak(b),
        }
    chain_hits, txs, logs = scan_chain(net.rpc_url, sorted(needles))
    ipfs_hits, blocks = asyncio.run(scan_ipfs(net.ipfs_api, sorted(needles)))
    file_hits = scan_files(
        [wd / "chain", wd / "ipfs.log", wd / "gateway" / "service.log", wd / "chain" / "anvil.log"],
        sorted(needles),
    )
    result = {
        "values_searched": len(values),
        "needles": len(needles),
        "transactions_scanned": txs,
        "logs_scanned": logs,
        "ipfs_blocks_scanned": blocks,
        "hits": chain_hits + ipfs_hits + file_hits,
    }
    print(json.dumps(result, indent=2))
    return 0 if not result["hits"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medledger", description="Consent-mediated DICOM exchange with an on-chain audit trail"
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("devnet", help="a local chain (Anvil) and IPFS node (Kubo)")
    d.add_argument("action", choices=["up", "down", "status"])
    d.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    d.set_defaults(func=cmd_devnet)

    s = sub.add_parser("serve", help="run the gateway (FastAPI) on the devnet in --workdir")
    s.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument(
        "--port", type=int, default=0, help="0 picks a free port (printed and written to devnet.json)"
    )
    s.add_argument(
        "--anchor-mode",
        choices=["tree", "event"],
        default="tree",
        help="batched tree heads, or one tx per event",
    )
    s.add_argument(
        "--anchor-delay",
        type=float,
        default=0.5,
        help="max seconds an event waits before its batch is anchored",
    )
    s.add_argument(
        "--anchor-batch", type=int, default=100_000, help="anchor as soon as this many events are pending"
    )
    s.add_argument(
        "--max-staleness", type=float, default=2.0, help="max age (s) of the chain state a decision uses"
    )
    s.add_argument("--poll-interval", type=float, default=0.25, help="seconds between chain event polls")
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("demo", help="the end-to-end story through the HTTP API")
    m.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    m.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    m.set_defaults(func=cmd_demo)

    a = sub.add_parser("audit", help="export and verify the audit log")
    asub = a.add_subparsers(dest="audit_command", required=True)
    ex = asub.add_parser("export", help="write the log with proofs as JSON lines (or FHIR, DICOM, CSV)")
    ex.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    ex.add_argument("--out", required=True)
    ex.add_argument(
        "--format",
        choices=["jsonl", "fhir", "dicom-xml", "csv"],
        default="jsonl",
        help="jsonl: verifiable, with proofs; fhir: FHIR R4 AuditEvent NDJSON; dicom-xml: DICOM audit messages",
    )
    ex.add_argument("--all", action="store_true", help="jsonl: include events not yet anchored")
    ve = asub.add_parser("verify", help="check an exported log against the chain alone")
    ve.add_argument("--events", required=True)
    ve.add_argument("--rpc", required=True)
    ve.add_argument("--contract", required=True, help="the AccessLedger address")
    ve.add_argument("--json", action="store_true")
    pr = asub.add_parser("prove", help="one event's record and inclusion proof")
    pr.add_argument("seq", type=int)
    pr.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    pr.add_argument("--out")
    ch = asub.add_parser("check", help="check one event's proof against the chain")
    ch.add_argument("proof", help="a file written by `audit prove`")
    ch.add_argument("--rpc", required=True)
    ch.add_argument("--contract", required=True, help="the AccessLedger address")
    ch.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)

    hi = sub.add_parser("history", help="a patient's access history (who viewed my images, when, why)")
    hi.add_argument("--gateway", required=True, help="the gateway URL")
    hi.add_argument("--key", required=True, help="the patient's (or delegate's) key file")
    hi.add_argument("--patient", required=True, help="the patientRef")
    hi.add_argument("--json", action="store_true")
    hi.set_defaults(func=cmd_history)

    sc = sub.add_parser(
        "scan-phi", help="scan chain, IPFS and devnet files for patient names/IDs (and plain hashes)"
    )
    sc.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    sc.add_argument("--dicom", action="append", help="take the names/IDs to look for from these files")
    sc.add_argument("--value", action="append", help="a value to look for")
    sc.set_defaults(func=cmd_scan_phi)

    de = sub.add_parser("deid", help="de-identify DICOM files (PS3.15 Annex E)")
    de.add_argument("input")
    de.add_argument("output")
    de.add_argument("--option", action="append", help="e.g. retain-uids, retain-longitudinal-modified-dates")
    de.set_defaults(func=cmd_deid)

    e = sub.add_parser(
        "edge",
        help="the hospital's edge: plain DICOMweb in, signed requests out; optional C-STORE SCP",
    )
    e.add_argument("--gateway", required=True, help="the gateway's base URL")
    e.add_argument("--key", required=True, help="the hospital's member key file (mode 0600)")
    e.add_argument("--listen", default="127.0.0.1:8042", help="HOST:PORT of the DICOMweb proxy (0 = free)")
    e.add_argument("--purpose", help="default X-MedLedger-Purpose for reads, e.g. TREAT")
    e.add_argument("--dimse-config", help="TOML/JSON: called AE title, calling AE titles -> member keys")
    e.add_argument("--dimse-port", type=int, help="C-STORE SCP port (default: the config's)")
    e.add_argument("--dimse-host", help="C-STORE SCP address (default: the config's)")
    e.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --listen address")
    e.set_defaults(func=cmd_edge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MedLedgerError as err:
        print(f"medledger: {err.message} [{err.code}]", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"medledger: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # no tracebacks for users: name the failure and exit non-zero
        print(f"medledger: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
