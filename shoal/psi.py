"""Private set intersection of the parties' id columns (vertical partitioning).

Parties that hold different columns of the same samples first agree on which
samples they share, without showing each other the ids they do not share.
shoal uses ECDH-PSI as implemented by OpenMined's ``openmined.psi`` (elliptic
curve Diffie-Hellman over P-256, the exact ``RAW`` setup: no false positives):

1. The *server* party hashes its ids onto the curve, blinds them with its
   secret key and sends them, shuffled (:meth:`Holder.setup`).
2. The *client* party (the label party) blinds its own ids with its key and
   sends them (:meth:`Seeker.request`); the server blinds them a second time
   and sends them back in order (:meth:`Holder.answer`).
3. The client removes its own blinding and compares: the matches are the
   intersection (:meth:`Seeker.intersection`), as positions in its own id list.

Only blinded points cross the wire. The client learns the intersection and
the size of the server's id set; the server learns the size of the client's.
With more than two parties the label party runs this with each other party
in turn, so it also learns which of its own ids each party holds (the pairwise
intersections); it then tells every party the common ids (ids that party
holds already), so the other parties learn the common ids and nothing else.

Messages are bytes (the library's protobuf encoding); :func:`checked` bounds
what a peer's message may make this process parse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from shoal.errors import UserError

MAX_MESSAGE_BYTES = 1 << 31
"""The largest PSI message accepted (about 33 bytes per id: ~60M ids)."""


def _psi() -> Any:
    try:
        import private_set_intersection.python as psi
    except ImportError:
        raise UserError(
            "--align psi needs openmined.psi: run 'bash scripts/setup.sh', or "
            "'pip install --no-deps openmined.psi' (its protobuf pin is too narrow)"
        ) from None
    return psi


def _keys(ids: Sequence[Any]) -> list[str]:
    return [str(i) for i in ids]


@contextlib.contextmanager
def _refused(what: str) -> Iterator[None]:
    """Any failure to parse or use a peer's message, as one ``ValueError``."""
    try:
        yield
    except ValueError:
        raise
    except Exception as e:  # protobuf's DecodeError, the library's RuntimeError
        raise ValueError(f"a malformed PSI {what}: {str(e).splitlines()[0][:120]}") from None


def checked(message: bytes) -> bytes:
    """``message`` if it is of a size this process accepts; else a ``ValueError``."""
    if not isinstance(message, bytes) or not 0 < len(message) <= MAX_MESSAGE_BYTES:
        raise ValueError("a PSI message of no or too many bytes")
    return message


class Holder:
    """A party that holds ids and answers (the PSI server): it learns only how many ids
    the seeker has."""

    def __init__(self, ids: Sequence[Any]) -> None:
        psi = _psi()
        self.psi = psi
        self.server = psi.server.CreateWithNewKey(True)
        self.ids = _keys(ids)

    def setup(self, seeker_count: int) -> bytes:
        """This party's blinded ids (shuffled), for a seeker of ``seeker_count`` ids."""
        raw = self.psi.DataStructure.RAW  # (exact: no false positives)
        return self.server.CreateSetupMessage(0.0, seeker_count, self.ids, raw).SerializeToString()

    def answer(self, request: bytes) -> bytes:
        """The seeker's blinded ids, blinded again by this party, in the seeker's order."""
        req = self.psi.Request()
        with _refused("request"):
            req.ParseFromString(checked(request))
            return self.server.ProcessRequest(req).SerializeToString()


class Seeker:
    """The party that learns the intersection (the PSI client: the label party)."""

    def __init__(self, ids: Sequence[Any]) -> None:
        psi = _psi()
        self.psi = psi
        self.client = psi.client.CreateWithNewKey(True)
        self.ids = _keys(ids)

    def request(self) -> bytes:
        """This party's blinded ids."""
        return self.client.CreateRequest(self.ids).SerializeToString()

    def intersection(self, setup: bytes, answer: bytes) -> list[int]:
        """Positions (in this party's id list) of the ids the holder has too, ascending."""
        s, r = self.psi.ServerSetup(), self.psi.Response()
        with _refused("setup or answer"):
            s.ParseFromString(checked(setup))
            r.ParseFromString(checked(answer))
            found = self.client.GetIntersection(s, r)
        if len(r.encrypted_elements) != len(self.ids):
            raise ValueError("a PSI answer for another number of ids than asked")
        return sorted(found)


def intersect(seeker_ids: Sequence[Any], holders: Sequence[Sequence[Any]]) -> list[int]:
    """In one process (tests, and one machine holding every party): positions in
    ``seeker_ids`` of the ids every holder has too, found through the PSI messages."""
    keep = list(range(len(seeker_ids)))
    for ids in holders:
        seeker = Seeker([seeker_ids[i] for i in keep])
        holder = Holder(ids)
        found = seeker.intersection(holder.setup(len(keep)), holder.answer(seeker.request()))
        keep = [keep[i] for i in found]
    return keep
