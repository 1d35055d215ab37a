"""Private set intersection (shoal.psi): exact intersections, and messages that carry
none of a party's raw ids."""

from __future__ import annotations

import numpy as np
import pytest

psi = pytest.importorskip("private_set_intersection.python")

from shoal import psi as shoal_psi  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def party_ids(seed: int, universe: int = 5000, keep: float = 0.7) -> list[int]:
    """70% of a shared universe of customer ids (the other 30% absent here)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10**9, 10**9 + universe), int(keep * universe), replace=False)
    return ids.tolist()


def test_two_parties_find_exactly_the_intersection():
    label, other = party_ids(0), party_ids(1)
    found = shoal_psi.intersect(label, [other])
    assert {label[i] for i in found} == set(label) & set(other)
    assert found == sorted(found)


def test_three_parties_find_what_all_hold():
    label, a, b = party_ids(0), party_ids(1), party_ids(2)
    found = shoal_psi.intersect(label, [a, b])
    assert {label[i] for i in found} == set(label) & set(a) & set(b)


def test_no_message_carries_a_raw_id():
    """Capture every message either party sends: none contains any of its ids, in
    text or as 8-byte integers, inside or outside the intersection."""
    label, other = party_ids(3), party_ids(4)
    seeker, holder = shoal_psi.Seeker(label), shoal_psi.Holder(other)
    setup = holder.setup(len(label))
    request = seeker.request()
    answer = holder.answer(request)
    for sender_ids, messages in ((other, [setup, answer]), (label, [request])):
        for message in messages:
            for i in sender_ids[:500]:
                assert str(i).encode() not in message
                assert int(i).to_bytes(8, "little") not in message
                assert int(i).to_bytes(8, "big") not in message
    found = seeker.intersection(setup, answer)
    assert {label[i] for i in found} == set(label) & set(other)


def test_crafted_messages_are_refused_with_one_error():
    """A peer's malformed bytes, points that are not on the curve, or an answer for
    another number of ids: each a ValueError, never a crash or a wrong intersection."""
    seeker, holder = shoal_psi.Seeker([1, 2, 3]), shoal_psi.Holder([2, 3, 4])
    good_setup, good_answer = holder.setup(3), holder.answer(seeker.request())
    with pytest.raises(ValueError):
        holder.answer(b"")
    with pytest.raises(ValueError, match="malformed"):
        seeker.intersection(b"\x0a\xff\xff\xff\xff\x0f", good_answer)
    not_a_point = psi.Response()
    not_a_point.encrypted_elements.extend([b"\x02" + b"\xff" * 32] * 3)
    with pytest.raises(ValueError, match="malformed"):
        seeker.intersection(good_setup, not_a_point.SerializeToString())
    short = psi.Response()
    short.ParseFromString(good_answer)
    del short.encrypted_elements[-1]
    with pytest.raises(ValueError):
        seeker.intersection(good_setup, short.SerializeToString())
    assert seeker.intersection(good_setup, good_answer) == [1, 2]
