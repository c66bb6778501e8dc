"""Seeking to a keyframe, checked where the demuxer landed: some demuxers only get near it.

MPEG-TS and MPEG-PS seek by a binary search over the file that compares decode timestamps with
the target and stops at whatever packet it reaches, often just after the keyframe wanted; decoding
from there starts at the next keyframe, and every frame in between is lost. So every seek here is
checked by a property of keyframes (random access points): every packet before one in decode order
is shown before it. A packet shown after the keyframe that arrives before the keyframe itself
means the seek went too far; the keyframe before is tried, then the start of the file. A seek that
lands early is fine: the packets before the keyframe are passed over without being decoded.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence

import av

from common.errors import InvalidMedia

# Keyframes to seek to (the one wanted, then the one before it) before reading from the start.
_TRIES = 2
# A timestamp before any packet: demuxers that search the file (MPEG-TS/PS) land on the first
# packet; those that refuse it (AVI, FLV) seek to the first timestamp exactly, from their index.
_BEFORE_ANY = -(1 << 40)


def packets_from(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, keyframes: Sequence[int], start: int
) -> Iterator[av.Packet]:
    """The video packets in decode order, from the keyframe whose pts is ``start`` on; from the
    first packet of the file when ``start`` is the first keyframe (``keyframes[0]``), so that what
    the first frames depend on (frames an edit list hides, say) is decoded too. Seeking also
    flushes the decoder."""
    if start != keyframes[0]:
        at = bisect.bisect_right(keyframes, start) - 1
        for anchor in reversed(keyframes[max(1, at - _TRIES + 1) : at + 1]):
            container.seek(anchor, stream=stream, backward=True, any_frame=False)
            packets = container.demux(stream)
            if (landed := _skip_to(packets, start)) is not None:
                yield landed
                yield from packets
                return
    packets = _rewind(container, stream, keyframes[0])
    if start == keyframes[0]:
        yield from packets
        return
    landed = _skip_to(packets, start)
    if landed is None:
        # Read from the start, the keyframe never came: decode everything, as a player would.
        yield from _rewind(container, stream, keyframes[0])
        return
    yield landed
    yield from packets


def _skip_to(packets: Iterator[av.Packet], start: int) -> av.Packet | None:
    """Pass over packets up to the one whose pts is ``start``; None if one shown later comes first."""
    for packet in packets:
        stamp = _stamp(packet)
        if stamp is None or packet.size == 0:
            continue
        if stamp == start:
            return packet
        if stamp > start:
            return None
    return None


def _rewind(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, first: int
) -> Iterator[av.Packet]:
    """The packets from the start of the stream: the first one read may not be shown after ``first``
    (the earliest pts of any frame)."""
    for target in (_BEFORE_ANY, first):
        try:
            container.seek(target, stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            continue
        packets = container.demux(stream)
        held: list[av.Packet] = []
        for packet in packets:
            held.append(packet)
            stamp = _stamp(packet)
            if stamp is None or packet.size == 0:
                continue
            if stamp <= first:
                return itertools.chain(held, packets)
            break
    raise InvalidMedia("the video cannot be read from its start: the demuxer does not seek back to it")


def _stamp(packet: av.Packet) -> int | None:
    return packet.pts if packet.pts is not None else packet.dts
