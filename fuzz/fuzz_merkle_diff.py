"""Fuzz Merkle diff planning over arbitrary children maps.

Invariants: ``diff_children`` is symmetric, sorted, and empty exactly when the two maps are equal
once zero digests are dropped (an absent child is an empty subtree); ``diff_leaf`` never lists a
key only the local side holds. As a bonus the same input drives ``MerkleModel``: incremental
updates must equal a rebuild, whatever the keys.

Run: ``python fuzz/fuzz_merkle_diff.py -max_total_time=30 fuzz/corpus/merkle_diff``
"""

from __future__ import annotations

import sys

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    from replication_engine import merkle

GEOMETRIES = [
    merkle.Geometry(2, 3),
    merkle.Geometry(4, 2),
    merkle.Geometry(16, 2),
    merkle.Geometry(256, 2),
]


def _digest(fdp: atheris.FuzzedDataProvider) -> str:
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        return merkle.ZERO_HEX
    if kind == 1:
        return f"{fdp.ConsumeIntInRange(0, 3):032x}"  # few values: frequent equality
    if kind == 2:
        return f"{fdp.ConsumeIntInRange(0, (1 << 128) - 1):032x}"
    if kind == 3:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))  # not even hex
    return merkle.ZERO_HEX.upper() if fdp.ConsumeBool() else "0"


def _name(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return f"{fdp.ConsumeIntInRange(0, 7):02x}"
    return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 6))


def _children(fdp: atheris.FuzzedDataProvider) -> dict[str, str]:
    return {_name(fdp): _digest(fdp) for _ in range(fdp.ConsumeIntInRange(0, 8))}


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    a = _children(fdp)
    b = dict(a) if fdp.ConsumeBool() else _children(fdp)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):  # small edits of a shared map
        b[_name(fdp)] = _digest(fdp)

    diff = merkle.diff_children(a, b)
    assert diff == merkle.diff_children(b, a), "diff_children is not symmetric"
    assert diff == sorted(set(diff)), "diff_children is not sorted and unique"
    assert set(diff) <= set(a) | set(b)
    nonzero_a = {k: v for k, v in a.items() if v != merkle.ZERO_HEX}
    nonzero_b = {k: v for k, v in b.items() if v != merkle.ZERO_HEX}
    assert (diff == []) == (nonzero_a == nonzero_b), (a, b, diff)
    for child in diff:
        assert a.get(child, merkle.ZERO_HEX) != b.get(child, merkle.ZERO_HEX)

    fetch = merkle.diff_leaf(a, b)
    assert set(fetch) <= set(b), "diff_leaf lists a key the remote does not hold"
    assert set(fetch) == {k for k, v in b.items() if a.get(k) != v}
    assert merkle.diff_leaf(a, a) == []

    # The model: keys from the input, real 128-bit digests.
    geometry = fdp.PickValueInList(GEOMETRIES)
    model = merkle.MerkleModel(geometry)
    truth: dict[str, str] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 30)):
        key = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8))
        if fdp.ConsumeIntInRange(0, 3) == 0:
            model.set(key, None)
            truth.pop(key, None)
        else:
            digest = f"{fdp.ConsumeIntInRange(0, (1 << 128) - 1):032x}"
            model.set(key, digest)
            truth[key] = digest
    built = merkle.MerkleModel.build(truth, geometry)
    assert (model.root, model.nodes, model.leaves) == (built.root, built.nodes, built.leaves)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
