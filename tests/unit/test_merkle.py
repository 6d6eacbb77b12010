"""RFC 9162 Merkle tree: CT reference vectors, a naive recursive reference, and properties."""

from __future__ import annotations

import hashlib

import pytest

from ledger import merkle
from ledger.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleFrontier,
    consistency_proof,
    hash_leaf,
    inclusion_proof,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

# ---- the CT reference vectors (certificate-transparency-go / transparency-dev merkle testdata) ----
CT_ENTRIES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_LEAVES = [hash_leaf(e) for e in CT_ENTRIES]
CT_ROOTS = [  # index = tree size
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
H96 = "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"
H5F = "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"
H6B = "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
HBC = "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
HCA = "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"
HD3 = "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"
H0E = "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"
CT_INCLUSION = [  # (index, tree size, path)
    (0, 8, [H96, H5F, H6B]),
    (5, 8, [HBC, HCA, HD3]),
]
CT_CONSISTENCY = [  # (old size, new size, proof)
    (1, 8, [H96, H5F, H6B]),
    (2, 8, [H5F, H6B]),
    (6, 8, [H0E, HCA, HD3]),
    (2, 5, [H5F, HBC]),
]


# ---- an independent, naive, recursive implementation of RFC 9162 2.1 ----------------------------
def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def naive_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return d[0]
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + naive_mth(d[:k]) + naive_mth(d[k:])).digest()


def naive_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*naive_path(m, d[:k]), naive_mth(d[k:])]
    return [*naive_path(m - k, d[k:]), naive_mth(d[:k])]


def naive_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [naive_mth(d)]
    k = _k(n)
    if m <= k:
        return [*naive_subproof(m, d[:k], b), naive_mth(d[k:])]
    return [*naive_subproof(m - k, d[k:], False), naive_mth(d[:k])]


def naive_proof(m: int, d: list[bytes]) -> list[bytes]:
    return naive_subproof(m, d, True)


def leaves(n: int) -> list[bytes]:
    return [hash_leaf(i.to_bytes(2, "big") + b"medledger") for i in range(n)]


def flip(h: bytes, bit: int = 0) -> bytes:
    b = bytearray(h)
    b[bit // 8 % len(b)] ^= 1 << (bit % 8)
    return bytes(b)


MAX = 40
L = leaves(MAX)
ROOTS = [naive_mth(L[:n]) for n in range(MAX + 1)]


# ---- vectors ------------------------------------------------------------------------------------
def test_hash_primitives() -> None:
    assert EMPTY_ROOT.hex() == CT_ROOTS[0]
    assert hash_leaf(b"").hex() == CT_ROOTS[1]
    assert node_hash(CT_LEAVES[0], CT_LEAVES[1]).hex() == CT_ROOTS[2]
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


@pytest.mark.parametrize("size", range(9))
def test_ct_roots(size: int) -> None:
    assert root(CT_LEAVES[:size]).hex() == CT_ROOTS[size]
    assert naive_mth(CT_LEAVES[:size]).hex() == CT_ROOTS[size]
    assert MerkleFrontier.from_leaves(CT_LEAVES[:size]).root().hex() == CT_ROOTS[size]


def test_ct_root_of_eight() -> None:
    assert root(CT_LEAVES).hex() == "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"


@pytest.mark.parametrize(("index", "size", "path"), CT_INCLUSION)
def test_ct_inclusion(index: int, size: int, path: list[str]) -> None:
    got = inclusion_proof(CT_LEAVES[:size], index)
    assert [p.hex() for p in got] == path
    assert verify_inclusion(CT_LEAVES[index], index, size, got, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
def test_ct_consistency(old: int, new: int, proof: list[str]) -> None:
    got = consistency_proof(CT_LEAVES[:new], old)
    assert [p.hex() for p in got] == proof
    assert verify_consistency(old, new, bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new]), got)


# ---- agreement with the naive reference ----------------------------------------------------------
def test_root_matches_naive() -> None:
    for n in [*range(MAX + 1), 63, 64, 65, 100, 127, 128, 129, 257]:
        d = leaves(n)
        assert root(d) == naive_mth(d), n


def test_proofs_match_naive() -> None:
    for n in range(1, MAX + 1):
        d = L[:n]
        for i in range(n):
            assert inclusion_proof(d, i) == naive_path(i, d), (i, n)
        for m in range(1, n + 1):
            want = [] if m == n else naive_proof(m, d)
            assert consistency_proof(d, m) == want, (m, n)


def test_subtree_root() -> None:
    assert merkle.subtree_root(L, 3, 3) == EMPTY_ROOT
    assert merkle.subtree_root(L, 8, 16) == naive_mth(L[8:16])
    assert merkle.subtree_root(L, 5, 22) == naive_mth(L[5:22])
    with pytest.raises(ValueError):
        merkle.subtree_root(L, 5, 4)
    with pytest.raises(ValueError):
        merkle.subtree_root(L, 0, MAX + 1)


# ---- inclusion properties ----------------------------------------------------------------------
def test_every_inclusion_proof_verifies_and_tampering_fails() -> None:
    for n in range(1, MAX + 1):
        d, r = L[:n], ROOTS[n]
        for i in range(n):
            proof = inclusion_proof(d, i)
            assert verify_inclusion(d[i], i, n, proof, r), (i, n)
            # A flipped bit anywhere: in the leaf, the root, any proof element.
            assert not verify_inclusion(flip(d[i], i), i, n, proof, r)
            assert not verify_inclusion(d[i], i, n, proof, flip(r, 255))
            for j in range(len(proof)):
                for bit in (0, 77, 255):
                    bad = list(proof)
                    bad[j] = flip(bad[j], bit)
                    assert not verify_inclusion(d[i], i, n, bad, r), (i, n, j, bit)
            # Wrong index (same tree, same proof).
            for wrong in {i - 1, i + 1, i ^ 1, i ^ 2, 0, n - 1} - {i}:
                assert not verify_inclusion(d[i], wrong, n, proof, r), (i, wrong, n)
            # Out of range index / size.
            assert not verify_inclusion(d[i], i, i, proof, r)
            assert not verify_inclusion(d[i], -1, n, proof, r)
            assert not verify_inclusion(d[i], n, n, proof, r)
            # Wrong size, checked against the honest root of that size: the stale proof fails
            # (unless it *is* the honest proof for that size, which then proves a true claim).
            for m in {n - 1, n + 1, 2 * n} - {n}:
                if i < m <= MAX:
                    honest = naive_path(i, L[:m])
                    assert verify_inclusion(d[i], i, m, proof, ROOTS[m]) == (honest == proof), (i, n, m)
            # Wrong length: an extra or a missing element.
            assert not verify_inclusion(d[i], i, n, [*proof, r], r)
            if proof:
                assert not verify_inclusion(d[i], i, n, proof[:-1], r)
                assert not verify_inclusion(d[i], i, n, proof[1:], r)


def test_inclusion_malformed_inputs_are_false_not_errors() -> None:
    d = L[:5]
    proof = inclusion_proof(d, 2)
    r = root(d)
    assert not verify_inclusion(d[2][:31], 2, 5, proof, r)
    assert not verify_inclusion(d[2], 2, 5, [*proof[:-1], proof[-1] + b"\x00"], r)
    assert not verify_inclusion(d[2], 2, 5, proof, r[:16])
    assert not verify_inclusion(d[2], 0, 0, [], EMPTY_ROOT)
    assert verify_inclusion(d[0], 0, 1, [], d[0])


def test_inclusion_proof_rejects_bad_index() -> None:
    with pytest.raises(ValueError):
        inclusion_proof(L[:3], 3)
    with pytest.raises(ValueError):
        inclusion_proof([], 0)
    with pytest.raises(ValueError):
        inclusion_proof(L[:3], -1)


# ---- consistency properties -------------------------------------------------------------------
def test_every_consistency_proof_verifies_and_tampering_fails() -> None:
    for n in range(1, MAX + 1):
        for m in range(1, n + 1):
            proof = consistency_proof(L[:n], m)
            ro, rn = ROOTS[m], ROOTS[n]
            assert verify_consistency(m, n, ro, rn, proof), (m, n)
            assert not verify_consistency(m, n, flip(ro, 3), rn, proof), (m, n)
            assert not verify_consistency(m, n, ro, flip(rn, 200), proof), (m, n)
            for j in range(len(proof)):
                for bit in (0, 131, 255):
                    bad = list(proof)
                    bad[j] = flip(bad[j], bit)
                    assert not verify_consistency(m, n, ro, rn, bad), (m, n, j, bit)
            if m < n:
                assert not verify_consistency(m, n, ro, rn, proof[:-1]), (m, n)
                assert not verify_consistency(m, n, ro, rn, [*proof, rn]), (m, n)
                assert not verify_consistency(m, n, ro, rn, []), (m, n)
                assert not verify_consistency(n, m, rn, ro, proof), (m, n)  # sizes swapped
            else:
                assert proof == []
                assert not verify_consistency(m, n, ro, rn, [ro])
            # Wrong sizes with the honest roots of those sizes: the stale proof fails unless it
            # is the honest proof for them.
            for m2, n2 in {(m - 1, n), (m + 1, n), (m, n - 1), (m, n + 1)} - {(m, n)}:
                if 1 <= m2 <= n2 <= MAX:
                    honest = [] if m2 == n2 else naive_proof(m2, L[:n2])
                    got = verify_consistency(m2, n2, ROOTS[m2], ROOTS[n2], proof)
                    assert got == (honest == proof), (m, n, m2, n2)


def test_consistency_edge_cases() -> None:
    d = L[:7]
    assert consistency_proof(d, 0) == []
    assert consistency_proof(d, 7) == []
    assert verify_consistency(0, 7, EMPTY_ROOT, root(d), [])
    assert not verify_consistency(0, 7, root(d), root(d), [])
    assert not verify_consistency(0, 7, EMPTY_ROOT, root(d), [root(d)])
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert not verify_consistency(-1, 7, EMPTY_ROOT, root(d), [])
    assert not verify_consistency(3, 7, root(d[:3])[:31], root(d), consistency_proof(d, 3))
    with pytest.raises(ValueError):
        consistency_proof(d, 8)
    with pytest.raises(ValueError):
        consistency_proof(d, -1)


def test_consistency_does_not_verify_a_forked_tree() -> None:
    forked = list(L[:20])
    forked[3] = flip(forked[3])
    for m in range(4, 20):
        proof = consistency_proof(forked, m)
        assert not verify_consistency(m, 20, ROOTS[m], root(forked), proof)


# ---- frontier ---------------------------------------------------------------------------------
def test_frontier_matches_root_after_every_append() -> None:
    d = leaves(300)
    f = MerkleFrontier()
    assert f.size == 0 and f.root() == EMPTY_ROOT
    for k, leaf in enumerate(d, start=1):
        f.append(leaf)
        assert f.size == len(f) == k
        assert len(f.hashes) == k.bit_count()
        assert f.root() == root(d[:k]), k


def test_frontier_rebuild_and_state() -> None:
    d = leaves(77)
    f = MerkleFrontier.from_leaves(d)
    g = MerkleFrontier.from_state(f.size, f.hashes)
    assert g.root() == f.root() == root(d)
    c = f.copy()
    c.append(d[0])
    assert f.size == 77 and c.size == 78 and c.root() == root([*d, d[0]])
    # The stored perfect subtrees are the left-to-right decomposition of the size.
    assert f.hashes == (root(d[:64]), root(d[64:72]), root(d[72:76]), d[76])
    assert CompactRange is MerkleFrontier
    with pytest.raises(ValueError):
        MerkleFrontier.from_state(77, f.hashes[:-1])
    with pytest.raises(ValueError):
        f.append(b"short")


def test_million_leaves_is_feasible() -> None:
    n = 1_000_000
    d = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]
    r = root(d)
    f = MerkleFrontier.from_leaves(d[:999_000])
    f.extend(d[999_000:])
    assert f.root() == r
    i = 777_777
    assert verify_inclusion(d[i], i, n, inclusion_proof(d, i), r)
    m = 654_321
    assert verify_consistency(m, n, root(d[:m]), r, consistency_proof(d, m))
