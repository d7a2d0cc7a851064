"""backends/label_scoring.py's `_restream` on byte layouts it knows and ones it does not: a
rewritten stream count where the layout is the plain one, None (the sequential fallback) otherwise,
never an exception."""

from __future__ import annotations

import pytest

from localroute.backends.label_scoring import _restream


def _u32(*xs: int) -> bytes:
    return b"".join(x.to_bytes(4, "little") for x in xs)


HEADER = b"\x07" * 8
CELLS = _u32(3) + b"cells of the stream"


def test_the_plain_layout_is_rewritten_for_the_scoring_context() -> None:
    # 4 streams, slot 2's cells: empty counts for streams 0, 1 and 3
    state = HEADER + _u32(4, 0, 0) + CELLS + _u32(0)
    assert _restream(state, 2, 4, 8) == HEADER + _u32(8) + CELLS + bytes(4 * 7)
    # one stream (a unified cache): the slot's cells are stream 0's
    unified = HEADER + _u32(1) + CELLS
    assert _restream(unified, 0, 1, 8) == HEADER + _u32(8) + CELLS + bytes(4 * 7)


@pytest.mark.parametrize(("state", "slot", "n_src"), [
    (b"", 0, 4),
    (b"\x00" * 3, 0, 1),
    (HEADER + _u32(1) + CELLS, 1, 1),  # a slot past the streams the state has (a unified cache)
    (HEADER + _u32(1, 0) + b"more", 1, 1),  # ... whose first cells count reads as an empty one
    (HEADER + _u32(1) + CELLS, -1, 1),
    (HEADER + _u32(4, 0, 0) + CELLS + _u32(0), 1, 4),  # slot 1's place holds cells, not an empty count
    (HEADER + _u32(4, 0, 0) + CELLS + _u32(5), 2, 4),  # a non-empty trailing stream
    (HEADER + _u32(3, 0, 0) + CELLS + _u32(0), 2, 4),  # another stream count
    (b"\xff" * 64, 0, 2),
])
def test_an_unknown_layout_gives_none(state: bytes, slot: int, n_src: int) -> None:
    assert _restream(state, slot, n_src, 8) is None
