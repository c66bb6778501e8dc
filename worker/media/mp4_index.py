"""Frame timestamps of an MP4 read from its sample tables, used only where FFmpeg agrees.

FFmpeg's MP4 demuxer makes every packet's timestamps from the sample tables of the movie box
(``stts`` decode-time deltas, ``ctts`` composition offsets, ``stss`` sync samples). Demuxing every
packet only to read those back costs about 3 µs a packet from Python (55 ms for 10 minutes at
30 fps) and reads the whole file; the tables themselves read in about a millisecond with NumPy.

The tables are trusted only where FFmpeg would make the same packets of them: every track's samples
lie within the file (the demuxer reads all tracks in one pass, and a sample past the end stops
it), no edit list hides or drops a frame, no value is one FFmpeg sets aside; FFmpeg's index has as
many samples, exactly our keyframes (searching back from the frame before each keyframe lands on
it) and the same decode time at each; and the packets of the first and the last GOP, demuxed,
carry exactly the timestamps and keyframe flags worked out for them. Fragmented files, truncated
files and anything unusual return None, and the caller demuxes every packet instead.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

# Boxes walked on the way from the movie box to a track's sample tables.
_CONTAINERS = {b"moov", b"trak", b"edts", b"mdia", b"minf", b"stbl"}
_TABLES = {b"elst", b"mdhd", b"hdlr", b"stts", b"ctts", b"stss", b"stsz", b"stsc", b"stco", b"co64"}
_REQUIRED = {b"mdhd", b"hdlr", b"stts", b"stsz", b"stsc"}
# A movie box larger than this is not worth reading into memory; the demuxer handles such files.
_MAX_MOVIE_BYTES = 16 * 1024 * 1024
# FFmpeg sets aside every composition offset of a track when one is larger than this, and reads
# decode-time deltas from 2**31 up as corrections; such tables are left to the demuxer.
_MAX_OFFSET = 1 << 28
_MAX_DELTA = (1 << 31) - 1


@dataclass(frozen=True)
class Timestamps:
    """Every frame's pts in presentation order, and the keyframes' pts."""

    pts: list[int]
    keyframe_pts: list[int]


@dataclass(frozen=True)
class _Track:
    timescale: int
    decode_times: np.ndarray  # int64, from 0, in decode order
    offsets: np.ndarray  # int64 composition offsets (zeros without ctts)
    keyframes: np.ndarray  # int64 sample numbers from 0, ascending


def has_sample_tables(container: av.container.InputContainer) -> bool:
    """Whether the container is MP4 or QuickTime, the formats whose index lives in sample tables."""
    return container.format.name.startswith("mov")


def read_timestamps(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Timestamps | None:
    """The stream's timestamps from its sample tables, or None where they cannot be trusted.

    May read packets from ``container``; after None, index from a freshly opened one.
    """
    if not has_sample_tables(container):
        return None
    try:
        track = _read_track(container.name, stream.index, len(stream.index_entries))
        if track is None or stream.time_base != Fraction(1, track.timescale):
            return None
        decode_shift = _agreed_decode_shift(stream, track)
        if decode_shift is None:
            return None
        presentation_shift = _agreed_presentation_shift(container, stream, track, decode_shift)
    except (OSError, ValueError, IndexError, MemoryError, struct.error, av.FFmpegError):
        return None
    if presentation_shift is None:
        return None
    pts = track.decode_times + track.offsets + (decode_shift + presentation_shift)
    return Timestamps(pts=np.sort(pts).tolist(), keyframe_pts=np.sort(pts[track.keyframes]).tolist())


# --- reading the tables ---------------------------------------------------------------------------


def _read_track(path: str, track_number: int, indexed: int) -> _Track | None:
    """The track's tables, if they describe as many samples as FFmpeg indexed (checked before
    anything is allocated per sample)."""
    found = _movie_box(path)
    if found is None:
        return None
    movie, file_size = found
    children = list(_children(movie))
    kinds = {kind for kind, _ in children}
    tracks = [_tables(payload) for kind, payload in children if kind == b"trak"]
    # With movie extends (fragmented MP4) the samples live in fragments, not in these tables.
    if b"mvex" in kinds or b"mvhd" not in kinds or track_number >= len(tracks):
        return None
    # The demuxer reads every track's samples in one interleaved pass, so a sample of any track
    # lying outside the file cuts the video short there.
    if not all(tables.keys() >= _REQUIRED and _samples_within(tables, file_size) for tables in tracks):
        return None
    tables = tracks[track_number]
    count = _sample_count(tables[b"stsz"])
    if bytes(tables[b"hdlr"][8:12]) != b"vide" or count != indexed:
        return None
    deltas = _run_lengths(tables[b"stts"], count, signed=False)
    if deltas is None or not ((deltas > 0) & (deltas <= _MAX_DELTA)).all():
        return None
    decode_times = np.zeros(count, dtype=np.int64)
    np.cumsum(deltas[:-1], out=decode_times[1:])
    offsets = _run_lengths(tables[b"ctts"], count, signed=True) if b"ctts" in tables else np.zeros(count, np.int64)
    keyframes = _sync_samples(tables[b"stss"], count) if b"stss" in tables else np.arange(count, dtype=np.int64)
    if offsets is None or keyframes is None or len(keyframes) == 0 or (np.abs(offsets) > _MAX_OFFSET).any():
        return None
    timescale = _timescale(tables[b"mdhd"])
    movie_timescale = _timescale(next(payload for kind, payload in children if kind == b"mvhd"))
    if b"elst" in tables and not _every_frame_within_the_edit(
        tables[b"elst"], decode_times + offsets, timescale, movie_timescale
    ):
        return None
    return _Track(timescale, decode_times, offsets, keyframes)


def _every_frame_within_the_edit(elst: memoryview, presented: np.ndarray, timescale: int, movie_timescale: int) -> bool:
    """Whether the edit list keeps and shows every frame: no edit, or one edit at normal rate
    whose span holds every frame's presentation time. FFmpeg decodes but never shows the frames
    outside an edit, and drops those past its end."""
    edits = _entries(elst, ">u8,>i8,>i2,>u2" if elst[0] == 1 else ">u4,>i4,>i2,>u2")
    if len(edits) == 0:
        return True
    if len(edits) > 1:
        return False
    duration, media_time, rate, rate_fraction = (int(value) for value in edits[0])
    if media_time < 0 or duration == 0 or (rate, rate_fraction) != (1, 0):
        return False
    # The span is in the movie's timescale; FFmpeg rescales it rounding to nearest.
    end = media_time + (duration * timescale + movie_timescale // 2) // movie_timescale
    return bool(presented.min() >= media_time and presented.max() < end)


def _movie_box(path: str) -> tuple[memoryview, int] | None:
    """The payload of the file's one movie box and the file's size, if every top-level box lies
    whole within the file (a truncated file fails this) and none is a movie fragment."""
    movie = None
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        at = 0
        while at < size:
            file.seek(at)
            kind, start, end = _header(file.read(16), at, size)
            if end > size or kind == b"moof" or (kind == b"moov" and movie is not None):
                return None
            if kind == b"moov":
                if end - start > _MAX_MOVIE_BYTES:
                    return None
                file.seek(start)
                movie = memoryview(file.read(end - start))
            at = end
    return None if movie is None else (movie, size)


def _header(data: bytes | memoryview, at: int, limit: int) -> tuple[bytes, int, int]:
    """A box's type and the absolute start and end of its payload."""
    size, kind = struct.unpack_from(">I4s", data, 0)
    start = at + 8
    if size == 1:
        (size,) = struct.unpack_from(">Q", data, 8)
        start = at + 16
    elif size == 0:
        size = limit - at
    if size < start - at:
        raise ValueError("box smaller than its header")
    return bytes(kind), start, at + size


def _children(payload: memoryview) -> Iterator[tuple[bytes, memoryview]]:
    at = 0
    while at + 8 <= len(payload):
        kind, start, end = _header(payload[at : at + 16], at, len(payload))
        if end > len(payload):
            raise ValueError("box runs past its parent")
        yield kind, payload[start:end]
        at = end


def _tables(track: memoryview) -> dict[bytes, memoryview]:
    found: dict[bytes, memoryview] = {}
    for kind, payload in _children(track):
        if kind in _CONTAINERS:
            found.update(_tables(payload))
        elif kind in _TABLES:
            if kind in found:
                raise ValueError(f"two {kind!r} boxes")
            found[kind] = payload
    return found


def _timescale(mdhd: memoryview) -> int:
    version = mdhd[0]
    (timescale,) = struct.unpack_from(">I", mdhd, 20 if version == 1 else 12)
    if timescale == 0:
        raise ValueError("zero timescale")
    return int(timescale)


def _sample_count(stsz: memoryview) -> int:
    return int(struct.unpack_from(">I", stsz, 8)[0])


def _samples_within(tables: dict[bytes, memoryview], file_size: int) -> bool:
    """Whether the track has samples, none empty (the demuxer's packets of size 0 are not frames),
    and all their bytes lie within the file, by chunk: where each chunk starts (stco or co64), how
    many samples it holds (stsc runs) and their sizes (stsz)."""
    if b"stco" in tables:
        starts = _entries(tables[b"stco"], ">u4").astype(np.int64)
    elif b"co64" in tables:
        starts = _entries(tables[b"co64"], ">u8").astype(np.int64)
    else:
        return False
    runs = _entries(tables[b"stsc"], ">u4,>u4,>u4")
    first_chunk, per_chunk = runs["f0"].astype(np.int64), runs["f1"].astype(np.int64)
    chunks = len(starts)
    if not len(runs) or first_chunk[0] != 1 or first_chunk[-1] > chunks or not (per_chunk > 0).all():
        return False
    if not (np.diff(first_chunk) > 0).all():
        return False
    samples_in = np.repeat(per_chunk, np.diff(np.append(first_chunk, chunks + 1)))
    uniform, count = struct.unpack_from(">II", tables[b"stsz"], 4)
    if count == 0 or samples_in.sum() != count:
        return False
    if uniform:
        # Uncompressed audio can have millions of samples of one size: no array per sample.
        lengths = samples_in * int(uniform)
    else:
        sizes = np.frombuffer(tables[b"stsz"], dtype=">u4", count=count, offset=12).astype(np.int64)
        if not sizes.all():
            return False
        lengths = np.add.reduceat(sizes, np.cumsum(samples_in) - samples_in)
    return bool((starts + lengths <= file_size).all())


def _entries(box: memoryview, fields: str) -> np.ndarray:
    (count,) = struct.unpack_from(">I", box, 4)
    return np.frombuffer(box, dtype=np.dtype(fields), count=count, offset=8)


def _run_lengths(box: memoryview, count: int, *, signed: bool) -> np.ndarray | None:
    """A run-length table (stts, ctts) expanded to one value a sample, if it covers every sample."""
    entries = _entries(box, f">u4,{'>i4' if signed else '>u4'}")
    runs = entries["f0"].astype(np.int64)
    if runs.sum() != count:
        return None
    return np.repeat(entries["f1"].astype(np.int64), runs)


def _sync_samples(stss: memoryview, count: int) -> np.ndarray | None:
    numbers = np.frombuffer(stss, dtype=">u4", count=struct.unpack_from(">I", stss, 4)[0], offset=8).astype(np.int64)
    if len(numbers) and (numbers[0] < 1 or numbers[-1] > count or not (np.diff(numbers) > 0).all()):
        return None
    return numbers - 1


# --- checking them against FFmpeg ---------------------------------------------------------------


def _agreed_decode_shift(stream: av.video.stream.VideoStream, track: _Track) -> int | None:
    """FFmpeg's decode times minus ours (edit lists move them), if they differ by the same constant
    at every keyframe, and FFmpeg's keyframes are exactly ours."""
    index = stream.index_entries
    count = len(track.decode_times)
    shift = index[0].timestamp - int(track.decode_times[0])
    times = (track.decode_times + shift).tolist()
    keyframes = track.keyframes.tolist()
    if keyframes[0] > 0 and index.search_timestamp(times[keyframes[0] - 1]) != -1:
        return None
    for number, following in zip(keyframes, [*keyframes[1:], count], strict=True):
        entry = index[number]
        if entry.timestamp != times[number] or not entry.is_keyframe:
            return None
        # Searching back from the frame before the next keyframe must land on this one.
        if index.search_timestamp(times[following - 1]) != number:
            return None
    return shift


def _first_gop_end(track: _Track) -> int:
    return int(track.keyframes[1]) if len(track.keyframes) > 1 else len(track.decode_times)


def _agreed_presentation_shift(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, track: _Track, shift: int
) -> int | None:
    """What FFmpeg adds to decode time plus offset to make pts (a constant: it shifts for negative
    offsets), checked on every packet of the first and the last GOP, and that the last GOP ends
    the stream."""
    expected = _Expected.of(track, shift)
    count = len(expected.dts)
    packets = _packets(container, stream)
    first = next(packets, None)
    if first is None or first.pts is None:
        return None
    added = first.pts - int(expected.pts[0])
    if not expected.run_matches(itertools.chain([first], packets), 0, _first_gop_end(track), added):
        return None
    if _first_gop_end(track) == count:
        return added if next(packets, None) is None else None
    last_keyframe = int(track.keyframes[-1])
    container.seek(int(expected.pts[last_keyframe]) + added, stream=stream, backward=True, any_frame=False)
    packets = _packets(container, stream)
    landed = next(packets, None)
    if landed is None or landed.dts is None:
        return None
    number = int(np.searchsorted(expected.dts, landed.dts))
    if number >= count or not expected.run_matches(itertools.chain([landed], packets), number, count, added):
        return None
    return added if next(packets, None) is None else None


def _packets(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
    # The demuxer's flush packet at the end (size 0) is not a sample.
    return (packet for packet in container.demux(stream) if packet.size)


@dataclass(frozen=True)
class _Expected:
    """What each sample's packet must carry, but for the constant FFmpeg adds to pts."""

    dts: np.ndarray
    pts: np.ndarray
    keyframe: np.ndarray

    @classmethod
    def of(cls, track: _Track, shift: int) -> _Expected:
        keyframe = np.zeros(len(track.decode_times), dtype=bool)
        keyframe[track.keyframes] = True
        dts = track.decode_times + shift
        return cls(dts, dts + track.offsets, keyframe)

    def run_matches(self, packets: Iterator[av.Packet], begin: int, end: int, added: int) -> bool:
        """Whether the next packets are samples ``begin`` to ``end`` (exclusive), as expected."""
        for number in range(begin, end):
            packet = next(packets, None)
            if (
                packet is None
                or packet.is_discard
                or packet.dts != int(self.dts[number])
                or packet.pts != int(self.pts[number]) + added
                or packet.is_keyframe != bool(self.keyframe[number])
            ):
                return False
        return True
