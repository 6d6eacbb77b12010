// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Membership} from "./Membership.sol";

/// @title AccessLedger — on-chain commitments to the gateway's audit log.
/// @notice The gateway keeps an append-only log of access events with gap-free sequence
/// numbers (0, 1, 2, ...). This contract holds commitments to it, in one of two forms:
///  - a tree anchor: the RFC 9162 Merkle tree head (root over events 0..treeSize-1, leaf hash
///    SHA-256(0x00 || canonical event bytes)) — the throughput mode, group-committed;
///  - an event anchor: the leaf hash of exactly one event, the next one (one event per tx).
/// Either form advances `treeSize`; anchors never go backwards, so a verifier holding the log
/// can recompute every anchor and detect edits, deletions, insertions and reordering. Nothing
/// here is personal data: only hashes, sizes and times.
contract AccessLedger {
    struct Anchor {
        uint64 firstSeq;
        uint64 treeSize;
        bytes32 root;
        uint64 timestamp;
        uint64 blockNumber;
        bool single;
    }

    /// @notice The membership registry; only gateway members may anchor.
    Membership public immutable membership;
    /// @notice Number of events committed so far.
    uint64 public treeSize;

    Anchor[] private _anchors;

    /// @notice A tree head over events 0..treeSize-1 was anchored (events firstSeq..treeSize-1 are new).
    event TreeAnchored(uint256 indexed index, uint64 firstSeq, uint64 treeSize, bytes32 root, bytes32 gatewayId);
    /// @notice One event's leaf hash was anchored.
    event EventAnchored(uint256 indexed index, uint64 indexed seq, bytes32 leafHash, bytes32 gatewayId);

    error NotAGateway(address caller);
    error TreeNotGrowing(uint64 current, uint64 proposed);
    error OutOfSequence(uint64 expected, uint64 given);

    constructor(Membership membership_) {
        membership = membership_;
    }

    /// @notice Anchor the Merkle tree head of the first `newTreeSize` events.
    function anchorTree(uint64 newTreeSize, bytes32 root) external {
        bytes32 gatewayId = _gateway();
        uint64 first = treeSize;
        if (newTreeSize <= first) revert TreeNotGrowing(first, newTreeSize);
        _anchors.push(
            Anchor({
                firstSeq: first,
                treeSize: newTreeSize,
                root: root,
                timestamp: uint64(block.timestamp),
                blockNumber: uint64(block.number),
                single: false
            })
        );
        treeSize = newTreeSize;
        emit TreeAnchored(_anchors.length - 1, first, newTreeSize, root, gatewayId);
    }

    /// @notice Anchor the leaf hash of event `seq`, which must be the next unanchored event.
    function anchorEvent(uint64 seq, bytes32 leafHash) external {
        bytes32 gatewayId = _gateway();
        if (seq != treeSize) revert OutOfSequence(treeSize, seq);
        _anchors.push(
            Anchor({
                firstSeq: seq,
                treeSize: seq + 1,
                root: leafHash,
                timestamp: uint64(block.timestamp),
                blockNumber: uint64(block.number),
                single: true
            })
        );
        treeSize = seq + 1;
        emit EventAnchored(_anchors.length - 1, seq, leafHash, gatewayId);
    }

    /// @notice Number of anchors.
    function anchorCount() external view returns (uint256) {
        return _anchors.length;
    }

    /// @notice An anchor by index.
    function anchor(uint256 index) external view returns (Anchor memory) {
        return _anchors[index];
    }

    /// @notice Anchors `start` .. `start+count-1` (clamped), for verifiers.
    function anchors(uint256 start, uint256 count) external view returns (Anchor[] memory out) {
        uint256 n = _anchors.length;
        if (start >= n) return new Anchor[](0);
        uint256 end = start + count > n ? n : start + count;
        out = new Anchor[](end - start);
        for (uint256 i = start; i < end; i++) {
            out[i - start] = _anchors[i];
        }
    }

    function _gateway() private view returns (bytes32 gatewayId) {
        if (!membership.hasRole(msg.sender, Membership.Role.Gateway)) revert NotAGateway(msg.sender);
        (gatewayId,,) = membership.memberOf(msg.sender);
    }
}
