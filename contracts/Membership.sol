// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title Membership — the consortium's institutions, their keys and roles, governed M-of-N.
/// @notice Every write path of MedLedger's other contracts checks membership here. An
/// institution is identified by a stable `memberId`; its signing key can be rotated without
/// losing the history recorded under that id. Changing membership takes `threshold` distinct
/// admin approvals: a proposal (which counts as its proposer's approval), further approvals,
/// and execution as soon as the threshold is reached. Admins sign EIP-712 messages, so any
/// gateway member can relay their proposals and approvals; admins may also call directly.
contract Membership is EIP712 {
    /// @notice Roles of members. `None` means "not a member".
    enum Role {
        None,
        Hospital,
        Auditor,
        Gateway,
        Admin
    }

    /// @notice What a governance proposal changes.
    enum Action {
        Add,
        Remove,
        ChangeRole,
        RotateKey,
        SetThreshold
    }

    struct Member {
        address key;
        Role role;
        bool active;
        string name;
    }

    struct Proposal {
        Action action;
        bytes32 memberId;
        address key;
        Role role;
        uint64 value;
        uint64 deadline;
        uint32 approvals;
        bool executed;
        string name;
    }

    bytes32 private constant PROPOSE_TYPEHASH = keccak256(
        "Propose(uint8 action,bytes32 memberId,address key,uint8 role,string name,uint64 value,uint64 deadline,uint256 nonce)"
    );
    bytes32 private constant APPROVE_TYPEHASH = keccak256("Approve(uint256 proposalId)");

    /// @notice Approvals needed to execute a proposal.
    uint64 public threshold;
    /// @notice Number of active admins.
    uint64 public adminCount;
    /// @notice Number of proposals made so far (ids are 1..proposalCount).
    uint256 public proposalCount;

    mapping(bytes32 memberId => Member) private _members;
    mapping(address key => bytes32 memberId) private _idOfKey;
    mapping(uint256 proposalId => Proposal) private _proposals;
    mapping(uint256 proposalId => mapping(bytes32 adminId => bool)) private _approved;
    mapping(uint256 proposalId => bytes32[]) private _approvers;
    mapping(address admin => uint256) public nonces;

    /// @notice A member was added.
    event MemberAdded(bytes32 indexed memberId, address indexed key, Role role, string name);
    /// @notice A member was removed; its key no longer authorizes anything.
    event MemberRemoved(bytes32 indexed memberId, address indexed key);
    /// @notice A member's role changed.
    event MemberRoleChanged(bytes32 indexed memberId, Role oldRole, Role newRole);
    /// @notice A member's key was rotated; the member id (and its history) stays.
    event MemberKeyRotated(bytes32 indexed memberId, address indexed oldKey, address indexed newKey);
    /// @notice The approval threshold changed.
    event ThresholdChanged(uint64 oldThreshold, uint64 newThreshold);
    /// @notice A governance proposal was made.
    event ProposalCreated(
        uint256 indexed proposalId, Action action, bytes32 indexed memberId, bytes32 indexed proposerId
    );
    /// @notice An admin approved a proposal.
    event ProposalApproved(uint256 indexed proposalId, bytes32 indexed adminId, uint32 approvals);
    /// @notice A proposal reached the threshold and was carried out.
    event ProposalExecuted(uint256 indexed proposalId);

    error NotAnAdmin(address signer);
    error UnknownProposal(uint256 proposalId);
    error ProposalAlreadyExecuted(uint256 proposalId);
    error ProposalExpired(uint256 proposalId);
    error AlreadyApproved(uint256 proposalId, bytes32 adminId);
    error SignatureExpired(uint64 deadline);
    error BadNonce(uint256 expected, uint256 given);
    error MemberExists(bytes32 memberId);
    error KeyInUse(address key);
    error UnknownMember(bytes32 memberId);
    error InvalidRole();
    error InvalidKey();
    error InvalidThreshold(uint64 threshold, uint64 adminCount);
    error LengthMismatch();

    /// @param ids Member ids of the founding members.
    /// @param keys Their keys.
    /// @param roles Their roles (at least `threshold_` admins).
    /// @param names Their display names (institution names; never patient data).
    /// @param threshold_ Approvals needed per proposal.
    constructor(
        bytes32[] memory ids,
        address[] memory keys,
        Role[] memory roles,
        string[] memory names,
        uint64 threshold_
    ) EIP712("MedLedger Membership", "1") {
        if (ids.length != keys.length || ids.length != roles.length || ids.length != names.length) {
            revert LengthMismatch();
        }
        for (uint256 i = 0; i < ids.length; i++) {
            _add(ids[i], keys[i], roles[i], names[i]);
        }
        _setThreshold(threshold_);
    }

    // ---------------------------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------------------------

    /// @notice The member a key belongs to, its role and whether it is active.
    function memberOf(address key) external view returns (bytes32 memberId, Role role, bool active) {
        memberId = _idOfKey[key];
        Member storage m = _members[memberId];
        if (memberId == bytes32(0) || m.key != key) return (bytes32(0), Role.None, false);
        return (memberId, m.role, m.active);
    }

    /// @notice A member by id.
    function member(bytes32 memberId)
        external
        view
        returns (address key, Role role, bool active, string memory name)
    {
        Member storage m = _members[memberId];
        return (m.key, m.role, m.active, m.name);
    }

    /// @notice Whether `key` is the current key of an active member holding `role`.
    function hasRole(address key, Role role) public view returns (bool) {
        bytes32 memberId = _idOfKey[key];
        if (memberId == bytes32(0)) return false;
        Member storage m = _members[memberId];
        return m.active && m.key == key && m.role == role;
    }

    /// @notice Whether `key` is the current key of any active member.
    function isActive(address key) public view returns (bool) {
        bytes32 memberId = _idOfKey[key];
        if (memberId == bytes32(0)) return false;
        Member storage m = _members[memberId];
        return m.active && m.key == key;
    }

    /// @notice A proposal by id.
    function proposal(uint256 proposalId) external view returns (Proposal memory) {
        return _proposals[proposalId];
    }

    /// @notice Whether admin `adminId` has approved `proposalId`.
    function hasApproved(uint256 proposalId, bytes32 adminId) external view returns (bool) {
        return _approved[proposalId][adminId];
    }

    /// @notice The EIP-712 domain separator of this contract (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---------------------------------------------------------------------------------------
    // Governance
    // ---------------------------------------------------------------------------------------

    /// @notice Propose a membership change, signed by an admin (relayable by anyone).
    /// @dev The proposal counts as the proposer's approval; with threshold 1 it executes at once.
    /// @param deadline Unix time after which neither this signature nor the proposal is valid.
    /// @param signature The admin's EIP-712 signature over `Propose`.
    /// @return proposalId The new proposal's id.
    function propose(
        Action action,
        bytes32 memberId,
        address key,
        Role role,
        string calldata name,
        uint64 value,
        uint64 deadline,
        uint256 nonce,
        bytes calldata signature
    ) external returns (uint256 proposalId) {
        if (block.timestamp > deadline) revert SignatureExpired(deadline);
        bytes32 digest = _hashTypedDataV4(
            keccak256(
                abi.encode(
                    PROPOSE_TYPEHASH,
                    uint8(action),
                    memberId,
                    key,
                    uint8(role),
                    keccak256(bytes(name)),
                    value,
                    deadline,
                    nonce
                )
            )
        );
        address signer = ECDSA.recover(digest, signature);
        bytes32 adminId = _requireAdmin(signer);
        if (nonces[signer] != nonce) revert BadNonce(nonces[signer], nonce);
        nonces[signer] = nonce + 1;

        proposalId = ++proposalCount;
        Proposal storage p = _proposals[proposalId];
        p.action = action;
        p.memberId = memberId;
        p.key = key;
        p.role = role;
        p.name = name;
        p.value = value;
        p.deadline = deadline;
        emit ProposalCreated(proposalId, action, memberId, adminId);
        _approve(proposalId, adminId);
    }

    /// @notice Approve a proposal, signed by an admin (relayable by anyone).
    function approve(uint256 proposalId, bytes calldata signature) external {
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(APPROVE_TYPEHASH, proposalId)));
        bytes32 adminId = _requireAdmin(ECDSA.recover(digest, signature));
        _approve(proposalId, adminId);
    }

    function _approve(uint256 proposalId, bytes32 adminId) private {
        Proposal storage p = _proposals[proposalId];
        if (proposalId == 0 || proposalId > proposalCount) revert UnknownProposal(proposalId);
        if (p.executed) revert ProposalAlreadyExecuted(proposalId);
        if (block.timestamp > p.deadline) revert ProposalExpired(proposalId);
        if (_approved[proposalId][adminId]) revert AlreadyApproved(proposalId, adminId);
        _approved[proposalId][adminId] = true;
        _approvers[proposalId].push(adminId);
        // Only approvals of admins who are still admins count: removing an admin (or demoting
        // one) withdraws the approvals it gave to proposals not yet executed.
        p.approvals = _liveApprovals(proposalId);
        emit ProposalApproved(proposalId, adminId, p.approvals);
        if (p.approvals >= threshold) {
            p.executed = true;
            _execute(p);
            emit ProposalExecuted(proposalId);
        }
    }

    function _liveApprovals(uint256 proposalId) private view returns (uint32 live) {
        bytes32[] storage ids = _approvers[proposalId];
        for (uint256 i = 0; i < ids.length; i++) {
            Member storage m = _members[ids[i]];
            if (m.active && m.role == Role.Admin) live += 1;
        }
    }

    function _execute(Proposal storage p) private {
        if (p.action == Action.Add) {
            _add(p.memberId, p.key, p.role, p.name);
        } else if (p.action == Action.Remove) {
            Member storage m = _existing(p.memberId);
            m.active = false;
            if (m.role == Role.Admin) {
                adminCount -= 1;
                if (threshold > adminCount) revert InvalidThreshold(threshold, adminCount);
            }
            delete _idOfKey[m.key];
            emit MemberRemoved(p.memberId, m.key);
        } else if (p.action == Action.ChangeRole) {
            Member storage m = _existing(p.memberId);
            if (p.role == Role.None) revert InvalidRole();
            Role old = m.role;
            if (old == Role.Admin) adminCount -= 1;
            if (p.role == Role.Admin) adminCount += 1;
            if (threshold > adminCount) revert InvalidThreshold(threshold, adminCount);
            m.role = p.role;
            emit MemberRoleChanged(p.memberId, old, p.role);
        } else if (p.action == Action.RotateKey) {
            Member storage m = _existing(p.memberId);
            if (p.key == address(0)) revert InvalidKey();
            if (_idOfKey[p.key] != bytes32(0)) revert KeyInUse(p.key);
            address old = m.key;
            delete _idOfKey[old];
            _idOfKey[p.key] = p.memberId;
            m.key = p.key;
            emit MemberKeyRotated(p.memberId, old, p.key);
        } else {
            _setThreshold(p.value);
        }
    }

    function _add(bytes32 memberId, address key, Role role, string memory name) private {
        if (memberId == bytes32(0)) revert UnknownMember(memberId);
        if (_members[memberId].role != Role.None) revert MemberExists(memberId);
        if (key == address(0)) revert InvalidKey();
        if (_idOfKey[key] != bytes32(0)) revert KeyInUse(key);
        if (role == Role.None) revert InvalidRole();
        _members[memberId] = Member({key: key, role: role, active: true, name: name});
        _idOfKey[key] = memberId;
        if (role == Role.Admin) adminCount += 1;
        emit MemberAdded(memberId, key, role, name);
    }

    function _setThreshold(uint64 newThreshold) private {
        if (newThreshold == 0 || newThreshold > adminCount) revert InvalidThreshold(newThreshold, adminCount);
        emit ThresholdChanged(threshold, newThreshold);
        threshold = newThreshold;
    }

    function _existing(bytes32 memberId) private view returns (Member storage m) {
        m = _members[memberId];
        if (m.role == Role.None || !m.active) revert UnknownMember(memberId);
    }

    function _requireAdmin(address signer) private view returns (bytes32) {
        if (!hasRole(signer, Role.Admin)) revert NotAnAdmin(signer);
        return _idOfKey[signer];
    }
}
