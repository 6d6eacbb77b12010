// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {Membership} from "./Membership.sol";

/// @title Consent — patient consent grants, signed by the patient's own key.
/// @notice A patient is known here only by an opaque random `patientRef` (mapped off-chain;
/// erasing that mapping leaves nothing on-chain that links to a person). A hospital member
/// attests the binding of a patientRef to the patient's key (enrollment). The patient — or a
/// delegate the patient appointed — signs grants and revocations (EIP-712); a gateway member
/// relays them. A grant lets one institution (`grantee`, a Membership member id) access one
/// study (`studyRef`, a keyed pseudonym) or all of the patient's studies (`studyRef == 0`), for
/// a set of purposes (a bitmask over HL7 PurposeOfUse codes, mapping in the gateway docs), from
/// `notBefore` until `notAfter`. Revocation takes effect in the block that records it.
contract Consent is EIP712 {
    struct Grant {
        bytes32 patientRef;
        bytes32 grantee;
        bytes32 studyRef;
        uint256 purposes;
        uint64 notBefore;
        uint64 notAfter;
        uint256 nonce;
    }

    struct Record {
        Grant grant;
        address signer;
        uint64 grantedAt;
        uint64 revokedAt;
        uint32 version;
        bool revoked;
    }

    struct Patient {
        address key;
        bytes32 enrolledBy;
        bool enrolled;
    }

    bytes32 private constant GRANT_TYPEHASH = keccak256(
        "Grant(bytes32 patientRef,bytes32 grantee,bytes32 studyRef,uint256 purposes,uint64 notBefore,uint64 notAfter,uint256 nonce)"
    );
    bytes32 private constant REVOKE_TYPEHASH = keccak256("Revoke(uint256 consentId,uint256 nonce)");
    bytes32 private constant ENROLL_TYPEHASH =
        keccak256("Enroll(bytes32 patientRef,address patientKey,uint64 deadline)");
    bytes32 private constant ROTATE_TYPEHASH =
        keccak256("RotatePatientKey(bytes32 patientRef,address newKey,uint256 nonce)");
    bytes32 private constant DELEGATE_TYPEHASH =
        keccak256("Delegate(bytes32 patientRef,address delegate,uint64 until,uint256 nonce)");

    /// @notice The membership registry every write path checks.
    Membership public immutable membership;
    /// @notice Number of grants recorded so far (ids are 1..consentCount).
    uint256 public consentCount;

    mapping(bytes32 patientRef => Patient) private _patients;
    mapping(bytes32 patientRef => uint256) public patientNonces;
    mapping(bytes32 patientRef => mapping(address delegate => uint64 until)) public delegateUntil;
    mapping(uint256 consentId => Record) private _records;
    mapping(bytes32 patientRef => uint256[]) private _consentsOf;

    /// @notice A hospital attested that `patientKey` is the key of the patient behind `patientRef`.
    event PatientEnrolled(bytes32 indexed patientRef, address indexed patientKey, bytes32 indexed hospitalId);
    /// @notice The patient replaced their key.
    event PatientKeyRotated(bytes32 indexed patientRef, address indexed oldKey, address indexed newKey);
    /// @notice The patient appointed (or, with `until` in the past, removed) a delegate.
    event DelegateSet(bytes32 indexed patientRef, address indexed delegate, uint64 until);
    /// @notice A consent was granted.
    event ConsentGranted(
        uint256 indexed consentId,
        bytes32 indexed patientRef,
        bytes32 indexed grantee,
        bytes32 studyRef,
        uint256 purposes,
        uint64 notBefore,
        uint64 notAfter,
        uint32 version,
        address signer
    );
    /// @notice A consent was revoked; it allows nothing from `revokedAt` on.
    event ConsentRevoked(uint256 indexed consentId, bytes32 indexed patientRef, uint64 revokedAt, address signer);

    error NotAGateway(address caller);
    error NotAHospital(address signer);
    error NotAGrantee(bytes32 grantee);
    error PatientNotEnrolled(bytes32 patientRef);
    error PatientAlreadyEnrolled(bytes32 patientRef);
    error NotPatientOrDelegate(bytes32 patientRef, address signer);
    error BadNonce(uint256 expected, uint256 given);
    error SignatureExpired(uint64 deadline);
    error InvalidWindow(uint64 notBefore, uint64 notAfter);
    error NoPurposes();
    error UnknownConsent(uint256 consentId);
    error AlreadyRevoked(uint256 consentId);
    error InvalidKey();

    modifier onlyGateway() {
        if (!membership.hasRole(msg.sender, Membership.Role.Gateway)) revert NotAGateway(msg.sender);
        _;
    }

    constructor(Membership membership_) EIP712("MedLedger Consent", "1") {
        membership = membership_;
    }

    // ---------------------------------------------------------------------------------------
    // Patients
    // ---------------------------------------------------------------------------------------

    /// @notice Record a hospital's attestation binding `patientRef` to `patientKey`.
    /// @param signature The hospital member's EIP-712 signature over `Enroll`.
    function enroll(bytes32 patientRef, address patientKey, uint64 deadline, bytes calldata signature)
        external
        onlyGateway
    {
        if (block.timestamp > deadline) revert SignatureExpired(deadline);
        if (patientKey == address(0)) revert InvalidKey();
        if (_patients[patientRef].enrolled) revert PatientAlreadyEnrolled(patientRef);
        address signer = ECDSA.recover(
            _hashTypedDataV4(keccak256(abi.encode(ENROLL_TYPEHASH, patientRef, patientKey, deadline))), signature
        );
        if (!membership.hasRole(signer, Membership.Role.Hospital)) revert NotAHospital(signer);
        (bytes32 hospitalId,,) = membership.memberOf(signer);
        _patients[patientRef] = Patient({key: patientKey, enrolledBy: hospitalId, enrolled: true});
        emit PatientEnrolled(patientRef, patientKey, hospitalId);
    }

    /// @notice The patient replaces their key, signing with the current one.
    function rotatePatientKey(bytes32 patientRef, address newKey, uint256 nonce, bytes calldata signature)
        external
        onlyGateway
    {
        Patient storage p = _enrolled(patientRef);
        if (newKey == address(0)) revert InvalidKey();
        address signer = ECDSA.recover(
            _hashTypedDataV4(keccak256(abi.encode(ROTATE_TYPEHASH, patientRef, newKey, nonce))), signature
        );
        if (signer != p.key) revert NotPatientOrDelegate(patientRef, signer);
        _useNonce(patientRef, nonce);
        address old = p.key;
        p.key = newKey;
        emit PatientKeyRotated(patientRef, old, newKey);
    }

    /// @notice The patient appoints a delegate (guardian, proxy) until `until` (0 removes).
    function setDelegate(bytes32 patientRef, address delegate, uint64 until, uint256 nonce, bytes calldata signature)
        external
        onlyGateway
    {
        Patient storage p = _enrolled(patientRef);
        address signer = ECDSA.recover(
            _hashTypedDataV4(keccak256(abi.encode(DELEGATE_TYPEHASH, patientRef, delegate, until, nonce))),
            signature
        );
        if (signer != p.key) revert NotPatientOrDelegate(patientRef, signer);
        _useNonce(patientRef, nonce);
        delegateUntil[patientRef][delegate] = until;
        emit DelegateSet(patientRef, delegate, until);
    }

    /// @notice The enrolled key of a patient and the hospital that attested it.
    function patient(bytes32 patientRef) external view returns (address key, bytes32 enrolledBy, bool enrolled) {
        Patient storage p = _patients[patientRef];
        return (p.key, p.enrolledBy, p.enrolled);
    }

    /// @notice Whether `signer` may act for the patient now (their key or a current delegate).
    function canActFor(bytes32 patientRef, address signer) public view returns (bool) {
        Patient storage p = _patients[patientRef];
        if (!p.enrolled) return false;
        return signer == p.key || delegateUntil[patientRef][signer] >= block.timestamp;
    }

    // ---------------------------------------------------------------------------------------
    // Grants
    // ---------------------------------------------------------------------------------------

    /// @notice Record a grant signed by the patient (or a delegate); relayed by a gateway.
    /// @return consentId The id of the new consent.
    function grant(Grant calldata g, bytes calldata signature) external onlyGateway returns (uint256 consentId) {
        _enrolled(g.patientRef);
        if (g.purposes == 0) revert NoPurposes();
        if (g.notAfter <= g.notBefore || g.notAfter <= block.timestamp) revert InvalidWindow(g.notBefore, g.notAfter);
        (address gKey,, bool gActive,) = membership.member(g.grantee);
        if (gKey == address(0) || !gActive) revert NotAGrantee(g.grantee);
        address signer = ECDSA.recover(_hashTypedDataV4(_hashGrant(g)), signature);
        if (!canActFor(g.patientRef, signer)) revert NotPatientOrDelegate(g.patientRef, signer);
        _useNonce(g.patientRef, g.nonce);
        consentId = ++consentCount;
        _records[consentId] = Record({
            grant: g,
            signer: signer,
            grantedAt: uint64(block.timestamp),
            revokedAt: 0,
            version: 1,
            revoked: false
        });
        _consentsOf[g.patientRef].push(consentId);
        emit ConsentGranted(
            consentId, g.patientRef, g.grantee, g.studyRef, g.purposes, g.notBefore, g.notAfter, 1, signer
        );
    }

    /// @notice Revoke a consent, signed by the patient (or a delegate); effective at once.
    function revoke(uint256 consentId, uint256 nonce, bytes calldata signature) external onlyGateway {
        Record storage r = _records[consentId];
        if (consentId == 0 || consentId > consentCount) revert UnknownConsent(consentId);
        if (r.revoked) revert AlreadyRevoked(consentId);
        address signer =
            ECDSA.recover(_hashTypedDataV4(keccak256(abi.encode(REVOKE_TYPEHASH, consentId, nonce))), signature);
        if (!canActFor(r.grant.patientRef, signer)) revert NotPatientOrDelegate(r.grant.patientRef, signer);
        _useNonce(r.grant.patientRef, nonce);
        r.revoked = true;
        r.revokedAt = uint64(block.timestamp);
        emit ConsentRevoked(consentId, r.grant.patientRef, r.revokedAt, signer);
    }

    /// @notice A consent record by id.
    function consent(uint256 consentId) external view returns (Record memory) {
        return _records[consentId];
    }

    /// @notice All consent ids of a patient, oldest first.
    function consentsOf(bytes32 patientRef) external view returns (uint256[] memory) {
        return _consentsOf[patientRef];
    }

    /// @notice Whether `grantee` may access `studyRef` of the patient for purpose bit `purpose` now.
    /// @return allowed True if some consent in force allows it.
    /// @return consentId The allowing consent (0 if none).
    function isAllowed(bytes32 patientRef, bytes32 grantee, bytes32 studyRef, uint8 purpose)
        external
        view
        returns (bool allowed, uint256 consentId)
    {
        uint256[] storage ids = _consentsOf[patientRef];
        uint256 bit = uint256(1) << purpose;
        for (uint256 i = ids.length; i > 0; i--) {
            Record storage r = _records[ids[i - 1]];
            Grant storage g = r.grant;
            if (
                !r.revoked && g.grantee == grantee && (g.studyRef == bytes32(0) || g.studyRef == studyRef)
                    && (g.purposes & bit) != 0 && g.notBefore <= block.timestamp && block.timestamp < g.notAfter
            ) {
                return (true, ids[i - 1]);
            }
        }
        return (false, 0);
    }

    /// @notice The EIP-712 domain separator of this contract (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _hashGrant(Grant calldata g) private pure returns (bytes32) {
        return keccak256(
            abi.encode(
                GRANT_TYPEHASH, g.patientRef, g.grantee, g.studyRef, g.purposes, g.notBefore, g.notAfter, g.nonce
            )
        );
    }

    function _enrolled(bytes32 patientRef) private view returns (Patient storage p) {
        p = _patients[patientRef];
        if (!p.enrolled) revert PatientNotEnrolled(patientRef);
    }

    function _useNonce(bytes32 patientRef, uint256 nonce) private {
        uint256 expected = patientNonces[patientRef];
        if (nonce != expected) revert BadNonce(expected, nonce);
        patientNonces[patientRef] = expected + 1;
    }
}
