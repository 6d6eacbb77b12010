"""DIMSE ingest at the hospital's edge: a C-STORE SCP that forwards to the gateway.

Modalities and PACS push with C-STORE (PS3.4 Annex B); they cannot sign requests, so this
SCP runs inside the hospital's trust boundary, holds the hospital's member key(s), and turns
each received instance into a signed STOW-RS upload through the SDK
(:meth:`ledger.client.GatewayClient.stow`). The gateway stores and audits it (UPLOAD) exactly
like any other upload; the C-STORE response status is derived from the gateway's answer.

Which calling AE titles may associate, and which member key each one uploads as, is
configuration (:func:`load_config`)::

    # dimse.toml (or the same structure as JSON)
    ae_title = "MEDLEDGER"      # the called AE title; associations naming another are rejected
    host = "127.0.0.1"          # where the SCP listens (the CLI's --dimse-host/--dimse-port win)
    port = 11112

    [callers.MODALITY1]         # a calling AE title that may store
    key_file = "keys/hospital-a.key"   # optional: the member key; default: the edge's --key
    hosts = ["127.0.0.1"]       # optional: peer addresses this AE title may connect from

An association from a calling AE title not in ``callers`` (or from a host not in its
``hosts``) is rejected: A-ASSOCIATE-RJ, rejected-permanent, "calling AE title not recognised".
"""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ledger.client import GatewayClient, GatewayError
from ledger.errors import InvalidInput, MedLedgerError
from ledger.keyfiles import read_key

log = logging.getLogger("medledger.dimse")

# C-STORE response statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (transient; a modality retries)
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
DUPLICATE_SOP_INSTANCE = 0x0111  # Failure: Duplicate SOP Instance
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized
PROCESSING_FAILURE = 0x0110  # Failure: Processing failure


def _is_failure_status(code: int) -> bool:
    """A failure status a C-STORE response may carry: 0xA7xx, 0xA9xx, 0xCxxx or 0x01xx."""
    return code >> 8 in (0xA7, 0xA9, 0x01) or code >> 12 == 0xC


_AE_TITLE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 _-.+")


def _ae_title(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty AE title")
    title = value.strip()
    if len(title) > 16 or not set(title) <= _AE_TITLE_CHARS:
        raise InvalidInput(
            f"{what} {title!r} is not a valid AE title (at most 16 characters, no control chars)"
        )
    return title


@dataclass(frozen=True)
class CallerConfig:
    """One calling AE title that may store, the key it uploads as, and where it may call from."""

    ae_title: str
    key_file: Path | None = None  # None: the edge's default key
    hosts: tuple[str, ...] = ()  # empty: any host


@dataclass(frozen=True)
class DimseConfig:
    ae_title: str = "MEDLEDGER"
    host: str = "127.0.0.1"
    port: int = 11112
    callers: dict[str, CallerConfig] = field(default_factory=dict)
    max_pdu: int = 0  # 0: unlimited (the pynetdicom default is 16382)


def parse_config(data: dict[str, Any], base_dir: Path) -> DimseConfig:
    """Validate a configuration mapping; relative key paths are relative to `base_dir`."""
    if not isinstance(data, dict):
        raise InvalidInput("the DIMSE configuration must be a mapping")
    unknown = set(data) - {"ae_title", "host", "port", "callers", "max_pdu"}
    if unknown:
        raise InvalidInput(f"unknown DIMSE configuration keys: {sorted(unknown)}")
    callers_raw = data.get("callers")
    if not isinstance(callers_raw, dict) or not callers_raw:
        raise InvalidInput("the DIMSE configuration needs a non-empty 'callers' table of calling AE titles")
    callers: dict[str, CallerConfig] = {}
    for title, entry in callers_raw.items():
        aet = _ae_title(title, "calling AE title")
        if entry is None:
            entry = {}
        if isinstance(entry, str):
            entry = {"key_file": entry}
        if not isinstance(entry, dict) or set(entry) - {"key_file", "hosts"}:
            raise InvalidInput(f"caller {aet!r}: expected a table with 'key_file' and/or 'hosts'")
        key_file = entry.get("key_file")
        if key_file is not None and not isinstance(key_file, str):
            raise InvalidInput(f"caller {aet!r}: 'key_file' must be a path")
        hosts = entry.get("hosts", [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise InvalidInput(f"caller {aet!r}: 'hosts' must be a list of addresses")
        path = None
        if key_file:
            path = Path(key_file).expanduser()
            if not path.is_absolute():
                path = (base_dir / path).resolve()
        if aet in callers:
            raise InvalidInput(f"calling AE title {aet!r} is configured twice")
        callers[aet] = CallerConfig(ae_title=aet, key_file=path, hosts=tuple(hosts))
    port = data.get("port", 11112)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidInput("'port' must be a TCP port number")
    host = data.get("host", "127.0.0.1")
    if not isinstance(host, str) or not host:
        raise InvalidInput("'host' must be an address")
    max_pdu = data.get("max_pdu", 0)
    if not isinstance(max_pdu, int) or max_pdu < 0:
        raise InvalidInput("'max_pdu' must be a non-negative integer")
    return DimseConfig(
        ae_title=_ae_title(data.get("ae_title", "MEDLEDGER"), "ae_title"),
        host=host,
        port=port,
        callers=callers,
        max_pdu=max_pdu,
    )


def load_config(path: Path) -> DimseConfig:
    """Read a DIMSE configuration file: TOML (``.toml``) or JSON (anything else)."""
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInput(f"the DIMSE configuration {path.name} does not parse: {err}") from None
    return parse_config(data, path.parent)


def status_from_stow(http_status: int, body: dict[str, Any]) -> int:
    """The C-STORE status for a one-instance STOW-RS answer (PS3.18 table 10.5.3-1 / PS3.4)."""
    stored = (body.get("00081199") or {}).get("Value") or []
    failed = (body.get("00081198") or {}).get("Value") or []
    if http_status == 200 and stored and not failed:
        return SUCCESS
    for item in failed:
        values = (item.get("00081197") or {}).get("Value") or []
        if values:
            reason = int(values[0])
            return reason if _is_failure_status(reason) else CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def status_from_error(err: Exception) -> int:
    """The C-STORE status when the gateway refused the request or could not be reached."""
    if isinstance(err, GatewayError):
        if err.status in (401, 403):
            return NOT_AUTHORIZED
        if err.status in (413, 429, 502, 503, 504):
            return OUT_OF_RESOURCES
        if err.status in (400, 415):
            return CANNOT_UNDERSTAND
        return PROCESSING_FAILURE
    if isinstance(err, httpx.HTTPError | OSError):
        return OUT_OF_RESOURCES
    return PROCESSING_FAILURE


class _Uploader:
    """One signed SDK client per member key, created on first use, one request at a time."""

    def __init__(self, gateway_url: str, key: bytes) -> None:
        self._url = gateway_url
        self._key = key
        self._client: GatewayClient | None = None
        self._lock = threading.Lock()

    def stow(self, data: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._client is None:
                self._client = GatewayClient(self._url, self._key)
            return self._client.stow([data])

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class StoreSCP:
    """The C-STORE SCP: accepts configured calling AEs, forwards each instance to the gateway."""

    def __init__(
        self,
        config: DimseConfig,
        gateway_url: str,
        default_key: bytes | None = None,
        *,
        on_stored: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config
        self._uploaders: dict[str, _Uploader] = {}
        by_key: dict[bytes, _Uploader] = {}
        for aet, caller in config.callers.items():
            if caller.key_file is not None:
                key = bytes(read_key(caller.key_file).key)
            elif default_key is not None:
                key = default_key
            else:
                raise InvalidInput(f"caller {aet!r} has no key_file and the edge has no default key")
            self._uploaders[aet] = by_key.setdefault(key, _Uploader(gateway_url, key))
        self._on_stored = on_stored
        self._server: ThreadedAssociationServer | None = None
        self.stats = {"stored": 0, "failed": 0, "rejected_associations": 0}
        self._stats_lock = threading.Lock()

    # ---- lifecycle ---------------------------------------------------------------------
    def _make_ae(self) -> AE:
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False  # identifiers may be PHI
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.config.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.config.callers)
        ae.maximum_pdu_size = self.config.max_pdu
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        return ae

    def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Start listening in background threads; returns the bound (host, port)."""
        ae = self._make_ae()
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_c_store)]
        address = (host or self.config.host, self.config.port if port is None else port)
        server = ae.start_server(address, block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the server
        self._server = server
        bound = server.server_address
        log.info("DIMSE C-STORE SCP %s listening on %s:%s", self.config.ae_title, bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        for up in set(self._uploaders.values()):
            up.close()

    # ---- events ------------------------------------------------------------------------
    def _on_requested(self, event: Event) -> None:
        rq = event.assoc.requestor
        # the A-ASSOCIATE-RQ as received (requestor.ae_title is only set once it is accepted)
        calling = str(getattr(rq.primitive, "calling_ae_title", "") or "").strip()
        caller = self.config.callers.get(calling)
        reason = None
        if caller is None:
            reason = "unknown calling AE title"
        elif caller.hosts and rq.address not in caller.hosts:
            reason = "calling AE title not allowed from this host"
        if reason is not None:
            with self._stats_lock:
                self.stats["rejected_associations"] += 1
            log.warning("association rejected: %s", reason)
            # rejected-permanent, service-user, calling AE title not recognised
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()

    def _on_c_store(self, event: Event) -> int:
        calling = (event.assoc.requestor.ae_title or "").strip()
        uploader = self._uploaders.get(calling)
        if uploader is None:  # not reachable: such associations are rejected
            return NOT_AUTHORIZED
        try:
            data = event.encoded_dataset(include_meta=True)  # PS3.10: preamble, DICM, meta, data set
        except Exception:
            log.warning("C-STORE request without a usable data set")
            return CANNOT_UNDERSTAND
        try:
            http_status, body = uploader.stow(data)
            status = status_from_stow(http_status, body)
        except (MedLedgerError, httpx.HTTPError, OSError, ValueError) as err:
            status = status_from_error(err)
            log.warning("forwarding a C-STORE to the gateway failed: %s", type(err).__name__)
        with self._stats_lock:
            self.stats["stored" if status == SUCCESS else "failed"] += 1
        if status != SUCCESS:
            log.info("C-STORE from %s answered with status 0x%04X", calling, status)
        if self._on_stored is not None:
            self._on_stored(calling, status)
        return status
