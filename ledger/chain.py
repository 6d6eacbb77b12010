"""Chain client: contracts, locally signed transactions, a local nonce manager, error decoding.

Works against any EVM JSON-RPC endpoint (Anvil locally; Besu/geth in a consortium): it uses
only standard `eth_*` methods. Transactions are signed locally (eth-account, with coincurve
installed eth-keys signs ~8x faster) and nonces are managed locally, so sending never waits
for a block; callers that need the outcome wait for the receipt explicitly, outside any
request's hot path. Contract reverts are decoded from the ABIs' custom errors into
:class:`~ledger.errors.ChainError` with the error's name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    MismatchedABI,
    TimeExhausted,
    Web3ValidationError,
)

from ledger.errors import ChainError, InvalidInput

CONTRACT_NAMES = ("Membership", "Consent", "AccessLedger")

# A contract's refusal of a relayed, signed message is the caller's error, not the gateway's:
# custom error name -> HTTP status of the refusal. Anything unlisted stays a 502.
CONTRACT_ERROR_STATUS: dict[str, int] = {
    **dict.fromkeys(("NotAnAdmin", "NotAHospital", "NotPatientOrDelegate", "NotAGateway"), 403),
    **dict.fromkeys(
        (
            "BadNonce",
            "AlreadyApproved",
            "AlreadyRevoked",
            "PatientAlreadyEnrolled",
            "MemberExists",
            "KeyInUse",
            "ProposalAlreadyExecuted",
            "TreeNotGrowing",
            "OutOfSequence",
        ),
        409,
    ),
    **dict.fromkeys(
        (
            "SignatureExpired",
            "ProposalExpired",
            "InvalidWindow",
            "NoPurposes",
            "InvalidKey",
            "InvalidRole",
            "InvalidThreshold",
            "UnknownMember",
            "UnknownProposal",
            "UnknownConsent",
            "NotAGrantee",
            "PatientNotEnrolled",
            "LengthMismatch",
            "ECDSAInvalidSignature",
            "ECDSAInvalidSignatureLength",
            "ECDSAInvalidSignatureS",
        ),
        400,
    ),
}


def _abi_type(inp: dict[str, Any]) -> str:
    t = str(inp["type"])
    if t.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in inp["components"])
        return f"({inner}){t[5:]}"
    return t


class ErrorDecoder:
    """Maps 4-byte custom-error selectors of the given ABIs to readable messages."""

    def __init__(self, abis: Sequence[list[dict[str, Any]]]) -> None:
        self._errors: dict[bytes, tuple[str, list[str], list[str]]] = {}
        for abi in abis:
            for item in abi:
                if item.get("type") != "error":
                    continue
                types = [_abi_type(i) for i in item["inputs"]]
                sig = f"{item['name']}({','.join(types)})"
                names = [i.get("name", "") for i in item["inputs"]]
                self._errors[keccak(text=sig)[:4]] = (item["name"], types, names)

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """(error name, arguments) of revert data; ("Revert", {}) when unknown."""
        if len(data) < 4 or data[:4] not in self._errors:
            return ("Revert", {})
        name, types, names = self._errors[data[:4]]
        try:
            values = abi_decode(types, data[4:])
        except Exception:  # malformed revert data: still name the error
            return (name, {})
        return (
            name,
            {
                n: (HexBytes(v).to_0x_hex() if isinstance(v, bytes) else v)
                for n, v in zip(names, values, strict=True)
            },
        )


@dataclass(frozen=True)
class SentTx:
    tx_hash: str
    nonce: int


class NonceManager:
    """Hands out consecutive nonces for one sender without asking the chain each time."""

    def __init__(self, w3: Web3, address: str) -> None:
        self._w3 = w3
        self._address = address
        self._lock = threading.Lock()
        self._next: int | None = None

    def take(self) -> int:
        with self._lock:
            if self._next is None:
                self._next = self._w3.eth.get_transaction_count(to_checksum_address(self._address), "pending")
            n = self._next
            self._next += 1
            return n

    def reset(self) -> None:
        with self._lock:
            self._next = None


class ChainClient:
    """Contracts of one deployment plus a sending account (the gateway's)."""

    def __init__(
        self,
        rpc_url: str,
        abis: dict[str, list[dict[str, Any]]],
        addresses: dict[str, str] | None = None,
        account: LocalAccount | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.rpc_url = rpc_url
        self.w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self.abis = abis
        self.addresses = {k: to_checksum_address(v) for k, v in (addresses or {}).items()}
        self.account = account
        self.errors = ErrorDecoder(list(abis.values()))
        self._nonces = NonceManager(self.w3, account.address) if account else None
        self._chain_id: int | None = None
        self._fees: tuple[float, dict[str, int]] | None = None

    # ---- basics ------------------------------------------------------------------------
    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.w3.eth.chain_id)
        return self._chain_id

    def contract(self, name: str) -> Contract:
        return self.w3.eth.contract(address=self.addresses[name], abi=self.abis[name])

    def fees(self) -> dict[str, int]:
        """Fee fields of a transaction (cached 5 s).

        EIP-1559 chains: the node's suggested tip, and a fee cap of twice the base fee plus that
        tip (room for the base fee to rise). Paying exactly the suggested tip matters: the node
        derives its suggestion from the tips recently paid, so paying a multiple of the suggested
        *gas price* (as this did before) doubled the price at every refresh under steady traffic
        (measured on Anvil: 4 gwei to 8e6 gwei within ~200 blocks) until the account ran dry.
        Chains without a base fee (e.g. a free-gas consortium chain) get the suggested gas price.
        """
        now = time.monotonic()
        if self._fees is None or now - self._fees[0] > 5.0:
            base = self.w3.eth.get_block("latest").get("baseFeePerGas")
            if base is None:
                fields = {"gasPrice": int(self.w3.eth.gas_price)}
            else:
                tip = int(self.w3.eth.max_priority_fee)
                fields = {"maxFeePerGas": 2 * int(base) + tip, "maxPriorityFeePerGas": tip}
            self._fees = (now, fields)
        return dict(self._fees[1])

    def gas_price(self) -> int:
        """The most a transaction pays per gas (the fee cap)."""
        f = self.fees()
        return f.get("maxFeePerGas", f.get("gasPrice", 0))

    def reset_nonces(self) -> None:
        """Forget the local nonce (after a failure); the next send asks the chain again."""
        if self._nonces is not None:
            self._nonces.reset()

    def _require_account(self) -> LocalAccount:
        if self.account is None or self._nonces is None:
            raise ChainError("this chain client has no sending account")
        return self.account

    # ---- errors --------------------------------------------------------------------------
    def decode_error(self, exc: Exception) -> ChainError:
        data: Any = getattr(exc, "data", None)
        if (
            isinstance(exc, ContractCustomError | ContractLogicError)
            and isinstance(data, str)
            and data.startswith("0x")
        ):
            name, args = self.errors.decode(bytes.fromhex(data[2:]))
            detail = ", ".join(f"{k}={v}" for k, v in args.items())
            err = ChainError(f"contract refused: {name}({detail})", code=f"chain:{name}")
            err.contract_error = name  # type: ignore[attr-defined]
            err.http_status = CONTRACT_ERROR_STATUS.get(name, 502)
            return err
        return ChainError(f"chain call failed: {type(exc).__name__}: {exc}")

    # ---- sending -------------------------------------------------------------------------
    def send(
        self,
        contract: str,
        function: str,
        *args: Any,
        gas: int | None = None,
        preflight: bool = True,
    ) -> SentTx:
        """Sign and send a call of ``contract.function(*args)``; does not wait for a block.

        With ``preflight`` the call is first simulated (``eth_call`` + gas estimate) so a
        revert becomes a :class:`ChainError` naming the contract's custom error before any
        transaction is sent. Without it, ``gas`` must be given (hot paths such as anchoring).
        The simulation runs against the ``pending`` block: its timestamp is the next block's,
        so time checks (deadlines, a delegate's expiry) see the time the transaction will meet,
        not the last mined block's (which lags when blocks are mined on demand, as on Anvil).
        """
        account = self._require_account()
        assert self._nonces is not None
        try:
            fn = getattr(self.contract(contract).functions, function)(*args)
        except (Web3ValidationError, MismatchedABI, ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"a value does not fit the contract's {function} call") from exc
        if preflight:
            try:
                fn.call({"from": account.address}, block_identifier="pending")
                estimated = fn.estimate_gas({"from": account.address}, block_identifier="pending")
            except (ContractCustomError, ContractLogicError) as exc:
                raise self.decode_error(exc) from exc
            gas = int(estimated * 1.25) + 10_000
        if gas is None:
            raise ChainError("gas must be given when preflight is off")
        nonce = self._nonces.take()
        tx = fn.build_transaction(
            {
                "from": account.address,
                "nonce": nonce,
                "gas": gas,
                **self.fees(),
                "chainId": self.chain_id,
            }
        )
        signed = account.sign_transaction(tx)
        try:
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        except Exception as exc:
            self._nonces.reset()
            raise ChainError(f"sending the transaction failed: {exc}") from exc
        return SentTx(tx_hash=HexBytes(tx_hash).to_0x_hex(), nonce=nonce)

    def wait(self, sent: SentTx, timeout: float = 60.0) -> Any:
        """Wait for a receipt; raise ChainError if the transaction reverted."""
        try:
            receipt = self.w3.eth.wait_for_transaction_receipt(
                HexBytes(sent.tx_hash), timeout=timeout, poll_latency=0.05
            )
        except TimeExhausted as exc:
            raise ChainError(f"transaction {sent.tx_hash} not mined within {timeout}s") from exc
        if receipt["status"] != 1:
            raise ChainError(f"transaction {sent.tx_hash} reverted")
        return receipt

    def transact(self, contract: str, function: str, *args: Any) -> Any:
        """Send with preflight and wait for the receipt (for state changes, not hot paths).

        If the transaction reverts even so (the state changed between simulation and block),
        the call is simulated again so the error names the contract's custom error.
        """
        try:
            return self.wait(self.send(contract, function, *args))
        except ChainError as err:
            if getattr(err, "contract_error", None) or "reverted" not in err.message:
                raise
            fn = getattr(self.contract(contract).functions, function)(*args)
            try:
                fn.call({"from": self._require_account().address}, block_identifier="pending")
            except (ContractCustomError, ContractLogicError) as exc:
                raise self.decode_error(exc) from err
            raise

    def deploy(self, name: str, bytecode: str, *args: Any) -> str:
        account = self._require_account()
        assert self._nonces is not None
        factory = self.w3.eth.contract(abi=self.abis[name], bytecode=bytecode)
        ctor = factory.constructor(*args)
        gas = int(ctor.estimate_gas({"from": account.address}) * 1.2) + 50_000
        tx = ctor.build_transaction(
            {
                "from": account.address,
                "nonce": self._nonces.take(),
                "gas": gas,
                **self.fees(),
                "chainId": self.chain_id,
            }
        )
        signed = account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.wait(SentTx(HexBytes(tx_hash).to_0x_hex(), int(tx["nonce"])))
        address = to_checksum_address(receipt["contractAddress"])
        self.addresses[name] = address
        return address


def load_account(key_hex: str) -> LocalAccount:
    """An account from a hex private key (with or without 0x)."""
    key = key_hex.strip()
    account: LocalAccount = Account.from_key(key if key.startswith("0x") else "0x" + key)
    return account
