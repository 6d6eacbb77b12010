"""RFC 9162 (Certificate Transparency v2) Merkle trees, section 2.1.

Pure functions over *leaf hashes* (32-byte ``SHA-256(0x00 || entry)`` values, see
:func:`ledger.events.leaf_hash`); nothing here hashes entries itself except :func:`hash_leaf`.

* ``MTH(D[n])`` is :func:`root`; the empty tree's root is ``SHA-256("")`` (:data:`EMPTY_ROOT`).
* ``PATH(m, D[n])`` is :func:`inclusion_proof`, checked by :func:`verify_inclusion` (2.1.3.2).
* ``PROOF(m, D[n])`` is :func:`consistency_proof`, checked by :func:`verify_consistency`
  (2.1.4.2).
* :class:`MerkleFrontier` (alias :data:`CompactRange`) keeps the roots of the perfect subtrees
  of a growing tree, so the root after each append costs O(log n) hashes.

Everything is iterative: a root over n leaves costs n - 1 node hashes and O(n) memory for one
level, a proof costs O(n) hashes (the sibling subtrees are hashed once each) and no recursion,
so trees of millions of leaves are fine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "MerkleFrontier",
    "consistency_proof",
    "hash_leaf",
    "inclusion_proof",
    "node_hash",
    "root",
    "subtree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def hash_leaf(entry: bytes) -> bytes:
    """RFC 9162 leaf hash of a raw entry: ``SHA-256(0x00 || entry)``."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def _reduce(level: list[bytes]) -> bytes:
    """MTH of a non-empty list of leaf hashes, bottom up.

    Pairing neighbours level by level and carrying an odd last node up unchanged gives exactly
    the RFC's left-balanced tree (split at the largest power of two below n).
    """
    sha = _sha256
    while len(level) > 1:
        odd = level[-1] if len(level) & 1 else None
        level = [sha(b"\x01" + a + b).digest() for a, b in zip(level[0::2], level[1::2], strict=False)]
        if odd is not None:
            level.append(odd)
    return level[0]


def subtree_root(leaves: Sequence[bytes], start: int, stop: int) -> bytes:
    """``MTH(D[start:stop])``; the empty range gives :data:`EMPTY_ROOT`."""
    if not 0 <= start <= stop <= len(leaves):
        raise ValueError(f"bad leaf range [{start}, {stop}) for {len(leaves)} leaves")
    if start == stop:
        return EMPTY_ROOT
    return _reduce(list(leaves[start:stop]))


def root(leaves: Sequence[bytes]) -> bytes:
    """``MTH(D[n])`` of the leaf hashes (RFC 9162 2.1.1)."""
    return subtree_root(leaves, 0, len(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """``PATH(index, D[n])`` (RFC 9162 2.1.3.1): sibling hashes from the leaf up to the root."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError(f"leaf index {index} out of range for tree size {n}")
    path: list[bytes] = []
    lo, hi = 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(subtree_root(leaves, lo + k, hi))
            hi = lo + k
        else:
            path.append(subtree_root(leaves, lo, lo + k))
            lo += k
    path.reverse()
    return path


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """``PROOF(old_size, D[n])`` (RFC 9162 2.1.4.1) between the first ``old_size`` leaves and all.

    The proof is empty when ``old_size`` is 0 or ``len(leaves)`` (nothing to prove).
    """
    n = len(leaves)
    if not 0 <= old_size <= n:
        raise ValueError(f"old size {old_size} out of range for tree size {n}")
    if old_size in (0, n):
        return []
    proof: list[bytes] = []
    # Unrolled SUBPROOF(m, D[lo:hi], b); each step appends the node that follows the sub-proof,
    # so the collected list is reversed at the end.
    m, lo, hi, whole = old_size, 0, n, True
    while True:
        size = hi - lo
        if m == size:
            if not whole:
                proof.append(subtree_root(leaves, lo, hi))
            break
        k = _split(size)
        if m <= k:
            proof.append(subtree_root(leaves, lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree_root(leaves, lo, lo + k))
            lo += k
            m -= k
            whole = False
    proof.reverse()
    return proof


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview) and len(value) == HASH_SIZE


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 2.1.3.2: does ``proof`` show leaf ``index`` hashing to ``leaf_hash`` in ``root``?

    Never raises on malformed input; anything malformed is simply ``False``.
    """
    if not (_is_hash(leaf_hash) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    if not (isinstance(index, int) and isinstance(tree_size, int)) or not 0 <= index < tree_size:
        return False
    fn, sn = index, tree_size - 1
    r = bytes(leaf_hash)
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(bytes(p), r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, bytes(p))
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == bytes(root)


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 2.1.4.2: is the tree of ``old_size`` leaves with ``old_root`` a prefix of the
    tree of ``new_size`` leaves with ``new_root``?

    Edge cases: equal sizes need an empty proof and equal roots; ``old_size == 0`` needs an
    empty proof and ``old_root == EMPTY_ROOT`` (the empty tree is a prefix of every tree).
    Never raises on malformed input.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not (isinstance(old_size, int) and isinstance(new_size, int)) or not 0 <= old_size <= new_size:
        return False
    old_root, new_root = bytes(old_root), bytes(new_root)
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if old_size == 0:
        return len(proof) == 0 and old_root == EMPTY_ROOT
    if len(proof) == 0:
        return False
    path = [bytes(p) for p in proof]
    if old_size & (old_size - 1) == 0:  # an exact power of two: the old root is a node itself
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class MerkleFrontier:
    """The compact range ``[0, size)`` of a growing tree: one perfect-subtree root per set bit of
    ``size``, largest (leftmost) first. ``append`` is O(1) amortised (O(log n) worst case) hashes,
    ``root`` is O(log n).
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MerkleFrontier:
        frontier = cls()
        frontier.extend(leaves)
        return frontier

    @classmethod
    def from_state(cls, size: int, hashes: Sequence[bytes]) -> MerkleFrontier:
        """Rebuild from a saved ``(size, hashes)`` pair (see :attr:`hashes`)."""
        if size < 0 or len(hashes) != size.bit_count() or not all(_is_hash(h) for h in hashes):
            raise ValueError("frontier state does not match its size")
        frontier = cls()
        frontier._size = size
        frontier._hashes = [bytes(h) for h in hashes]
        return frontier

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """Roots of the perfect subtrees covering ``[0, size)``, left to right."""
        return tuple(self._hashes)

    def __len__(self) -> int:
        return self._size

    def copy(self) -> MerkleFrontier:
        return MerkleFrontier.from_state(self._size, self._hashes)

    def append(self, leaf: bytes) -> None:
        if not _is_hash(leaf):
            raise ValueError("a leaf hash is 32 bytes")
        h = bytes(leaf)
        s = self._size
        stack = self._hashes
        while s & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            s >>= 1
        stack.append(h)
        self._size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        r = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def __repr__(self) -> str:
        return f"MerkleFrontier(size={self._size}, root={self.root().hex()})"


CompactRange = MerkleFrontier
