"""Server-Sent Events read from a byte stream, as the WHATWG HTML standard's parser reads them.

Bytes arrive in chunks of any size, so a line (and a CR LF pair) can straddle two chunks; the
parser keeps the unfinished line until its end arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEMessage:
    event: str
    data: str
    id: str | None


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        start = 0
        while True:
            cr, lf = pending.find(b"\r", start), pending.find(b"\n", start)
            ends = [i for i in (cr, lf) if i != -1]
            if not ends:
                break
            end = min(ends)
            if pending[end : end + 1] == b"\r" and end + 1 == len(pending):
                break  # the next chunk may begin with the LF of this CR LF
            yield pending[start:end].decode("utf-8", errors="replace")
            start = end + (2 if pending[end : end + 2] == b"\r\n" else 1)
        pending = pending[start:]
    # A stream that ends mid-event drops it (the standard's rule); a lone CR still ends a line.
    if pending.endswith(b"\r"):
        yield pending[:-1].decode("utf-8", errors="replace")


def parse_sse(chunks: Iterable[bytes]) -> Iterator[SSEMessage]:
    """The messages in ``chunks``, each when the blank line that ends it has arrived.

    ``id`` is the last event id seen so far in the stream (the standard keeps it across
    messages), which is what a reconnecting client sends back as ``Last-Event-ID``.
    """
    event, last_id = "", None
    data: list[str] = []
    for line in _lines(chunks):
        if not line:
            if data:
                yield SSEMessage(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue  # a comment: keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
