"""Frame sampling on real-world shapes of file the suite encodes itself, checked pixel for pixel
against decoding every frame (the reference notebook's way)."""

from __future__ import annotations

import random
import struct
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest

from common.errors import InvalidMedia, InvalidRequest
from common.schemas import Sampling
from worker.fixtures.synthetic_videos import read_frame_index, write_cat_video
from worker.media.mp4_index import read_timestamps
from worker.media.sampling import (
    Segment,
    choose_positions,
    decode_positions,
    decode_segments,
    index_stream,
    sample_frames,
)

# Variable frame rate: irregular gaps, some long, some a few milliseconds.
VFR_TIMES = [round(i * 0.04 + (0.03 if i % 5 == 2 else 0) + (0.2 if i >= 30 else 0), 3) for i in range(60)]

FILES = {
    "h264": dict(name="plain.mp4", seconds=3, fps=30),
    "h264_bframes_long_gop": dict(name="bframes.mp4", seconds=4, fps=30, gop=50, bframes=3),
    "h264_open_gop": dict(name="open.mp4", seconds=3, fps=30, gop=24, bframes=3, open_gop=True),
    "vfr": dict(name="vfr.mp4", frame_times=VFR_TIMES, gop=12, bframes=2),
    "mkv_to_pipe": dict(name="pipe.mkv", seconds=3, fps=25, gop=20, bframes=2, to_pipe=True),
    "fragmented_mp4": dict(name="frag.mp4", seconds=3, fps=30, gop=20, bframes=2, fragmented=True),
    "with_audio": dict(name="audio.mp4", seconds=2, fps=30, gop=15, audio=True),
    "hevc": dict(name="hevc.mp4", seconds=2, fps=25, codec="libx265", gop=20),
    "hevc_open_gop": dict(name="hevc_open.mp4", seconds=2, fps=25, codec="libx265", gop=16, open_gop=True),
    "vp9_webm_with_audio": dict(name="vp9.webm", seconds=2, fps=24, codec="libvpx-vp9", gop=12, audio=True),
    "av1": dict(name="av1.mp4", seconds=2, fps=24, codec="libsvtav1", gop=16),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("frames")
    made = {}
    for kind, spec in FILES.items():
        spec = dict(spec)
        made[kind] = write_cat_video(root / spec.pop("name"), width=160, height=120, **spec)
    return made


@cache
def _decode_everything(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """The reference notebook's way: decode every frame, in presentation order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sorted(container.decode(stream), key=lambda f: f.pts)
        first = frames[0].pts
        times = [float((f.pts - first) * stream.time_base) for f in frames]
        return [f.to_ndarray(format="rgb24") for f in frames], times


def _notebook_indices(total: int, wanted: int) -> list[int]:
    if total < wanted:
        return list(range(total))
    step = total // wanted
    return [i * step for i in range(wanted)]


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("wanted", [1, 7, 16])
def test_default_strategy_picks_the_notebook_frames_exactly(videos: dict[str, Path], kind: str, wanted: int) -> None:
    reference, times = _decode_everything(videos[kind])
    sampled = sample_frames(videos[kind], Sampling(num_frames=wanted))
    assert [frame.index for frame in sampled] == _notebook_indices(len(reference), wanted)
    for frame in sampled:
        assert frame.time == pytest.approx(times[frame.index], abs=1e-6)
        assert np.array_equal(frame.array, reference[frame.index]), f"frame {frame.index} differs"
        assert read_frame_index(frame.array) == frame.index


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("fast", [False, True])
def test_decoders_on_parallel_threads_give_the_same_frames(videos: dict[str, Path], kind: str, fast: bool) -> None:
    """Two threads, each its own decoder on a share of the seeks, against one decoder: same frames.
    Sixteen targets make several seeks on every file, so the seeks are shared between the two."""
    path = videos[kind]
    index = index_stream(path)
    positions = choose_positions(index, Sampling(num_frames=16))
    alone = decode_positions(path, index, positions, fast=fast, threads=1)
    shared = decode_positions(path, index, positions, fast=fast, threads=2)
    assert [(f.index, f.time, f.offset) for f in shared] == [(f.index, f.time, f.offset) for f in alone]
    for one, other in zip(shared, alone, strict=True):
        assert np.array_equal(one.array, other.array), f"frame {one.index} differs"


def test_seeks_that_divide_evenly_run_on_decoders_of_their_own(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from worker.media import sampling as frames

    path = videos["h264_bframes_long_gop"]
    index = index_stream(path)
    segments = frames.plan_segments(index, [index.pts[p] for p in choose_positions(index, Sampling(num_frames=16))])
    seen: set[str] = set()
    original = frames._decode_on_one

    def recording(*args: object, **kwargs: object) -> object:
        seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(frames, "_decode_on_one", recording)
    # Each decoder's frames come as soon as it is done with them, so the first can be sent on
    # while the second decodes: two hand-overs, sharing no target, together every target.
    shares = list(frames.decode_shares(path, index, segments, threads=2))
    assert len(seen) == 2 and all(name.startswith("decoder") for name in seen), seen
    assert len(shares) == 2 and not shares[0].keys() & shares[1].keys()
    assert shares[0].keys() | shares[1].keys() == {t for s in segments for t in s.targets}
    seen.clear()
    # All the work in one seek: one decoder with two frame threads instead.
    decode_segments(path, index, [frames.Segment(index.pts[0], (index.pts[40],))], threads=2)
    assert seen == {threading.current_thread().name}


@pytest.mark.parametrize("kind", ["h264_open_gop", "hevc_open_gop", "h264_bframes_long_gop", "mkv_to_pipe"])
def test_every_frame_around_each_keyframe_decodes_exactly_on_its_own(videos: dict[str, Path], kind: str) -> None:
    """Single targets force a seek each: leading B-frames of an open GOP, the frames just before a
    keyframe and the keyframes themselves."""
    path = videos[kind]
    index = index_stream(path)
    reference, _ = _decode_everything(path)
    keyframes = [index.position_of(pts) for pts in index.keyframe_pts]
    around = sorted({p for k in keyframes for p in range(k - 3, k + 2) if 0 <= p < index.frame_count})
    for position in around:
        [frame] = decode_positions(path, index, [position])
        assert frame.index == position
        assert np.array_equal(frame.array, reference[position]), f"frame {position} differs"


def test_frame_count_and_times_come_from_the_stream(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264_bframes_long_gop"])
    assert index.frame_count == 120
    assert index.pts == sorted(index.pts)
    assert len(index.keyframe_pts) >= 3
    # A pipe-written Matroska file declares neither duration nor frame count.
    with av.open(str(videos["mkv_to_pipe"])) as container:
        assert container.duration is None and not container.streams.video[0].frames
    assert index_stream(videos["mkv_to_pipe"]).frame_count == 75
    vfr = index_stream(videos["vfr"])
    assert [round(vfr.seconds(i), 3) for i in range(vfr.frame_count)] == [t - VFR_TIMES[0] for t in VFR_TIMES]


def _demuxed(path: Path) -> tuple[list[int], list[int]]:
    """Every packet's pts and the keyframes' pts, demuxed one by one (frames an edit list hides
    left out): what an MP4's sample tables must agree with."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size and not p.is_discard]
    stamped = [(p.pts, p.is_keyframe) for p in packets if p.pts is not None]
    assert len(stamped) == len(packets), "a packet without a timestamp"
    return sorted(pts for pts, _ in stamped), sorted(pts for pts, keyframe in stamped if keyframe)


def _read_tables(path: Path) -> tuple[list[int], list[int]] | None:
    with av.open(str(path)) as container:
        found = read_timestamps(container, container.streams.video[0])
    return None if found is None else (found.pts, found.keyframe_pts)


@pytest.mark.parametrize("kind", list(FILES))
def test_mp4_sample_tables_give_the_timestamps_every_packet_carries(videos: dict[str, Path], kind: str) -> None:
    path = videos[kind]
    if path.suffix == ".mp4" and kind != "fragmented_mp4":
        assert _read_tables(path) == _demuxed(path)
    else:
        # Matroska and WebM have no sample tables; a fragmented MP4's samples are in its fragments.
        assert _read_tables(path) is None


def test_an_edit_list_that_cuts_the_first_frames_hides_them(videos: dict[str, Path], tmp_path: Path) -> None:
    """As a cut without re-encoding leaves it: the edit starts seven frames in, so FFmpeg decodes
    those frames for the ones after them but shows none. They are not counted, and the sample
    tables, which list them, are set aside."""
    data = bytearray(videos["h264_bframes_long_gop"].read_bytes())
    entry = data.index(b"elst") + 12  # past version, flags and entry count: the one edit
    duration, media_time, rate = struct.unpack_from(">IiI", data, entry)
    struct.pack_into(">IiI", data, entry, duration, media_time + 7, rate)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data)
    reference, _ = _decode_everything(cut)
    assert len(reference) == 120 - 7
    assert _read_tables(cut) is None
    assert index_stream(cut).frame_count == len(reference)
    for wanted in (7, 16):
        sampled = sample_frames(cut, Sampling(num_frames=wanted))
        assert [frame.index for frame in sampled] == _notebook_indices(len(reference), wanted)
        for frame in sampled:
            assert np.array_equal(frame.array, reference[frame.index]), f"frame {frame.index} differs"


def test_an_mp4_cut_off_keeps_the_frames_before_the_cut(videos: dict[str, Path], tmp_path: Path) -> None:
    """The movie box up front still lists all 120 samples, but the media data stops two thirds in:
    the tables are set aside and the frames that are there make the index."""
    whole = tmp_path / "faststart.mp4"
    with (
        av.open(str(videos["h264_bframes_long_gop"])) as source,
        av.open(str(whole), "w", options={"movflags": "faststart"}) as target,
    ):
        out = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                target.mux(packet)
    assert _read_tables(whole) == _demuxed(whole)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with av.open(str(cut)) as container:
        assert len(container.streams.video[0].index_entries) == 120
    assert _read_tables(cut) is None
    index = index_stream(cut)
    assert 0 < index.frame_count < 120
    reference, times = _decode_everything(whole)
    for frame in sample_frames(cut, Sampling(num_frames=8)):
        assert np.array_equal(frame.array, reference[times.index(frame.time)])


def test_corrupt_movie_boxes_never_change_which_frames_are_chosen(videos: dict[str, Path], tmp_path: Path) -> None:
    """Bytes of the movie box (both tracks' tables, the codec set-up) overwritten at random: where
    the tables are still trusted, every frame's pts is what the packets carry and the frames
    sampled are those decoding everything gives. Keyframes are not compared: where a lying sync
    table marks a frame the bitstream does not, the packets follow the bitstream, and a seek that
    lands on such a frame decodes nothing and is retried from the keyframe before."""
    source = videos["with_audio"].read_bytes()
    movie = source.index(b"moov") - 4
    rng = random.Random(7)
    trusted = set_aside = 0
    for trial in range(40):
        data = bytearray(source)
        for _ in range(rng.choice([1, 2, 4])):
            data[rng.randrange(movie, len(data))] = rng.randrange(256)
        path = tmp_path / f"corrupt{trial}.mp4"
        path.write_bytes(data)
        try:
            found = _read_tables(path)
            packets, _ = _demuxed(path)
            reference, _ = _decode_everything(path)
        except (av.FFmpegError, IndexError, UnicodeDecodeError):
            continue  # FFmpeg (or PyAV, on its metadata) cannot open or demux it: nothing to agree with
        if found is None:
            set_aside += 1
            continue
        trusted += 1
        assert found[0] == packets
        if len(reference) == len(packets):
            for frame in sample_frames(path, Sampling(num_frames=7)):
                assert np.array_equal(frame.array, reference[frame.index]), f"trial {trial}: frame {frame.index}"
    assert trusted and set_aside


def test_a_phone_video_comes_out_upright(tmp_path: Path) -> None:
    # Stored landscape with a display matrix, as phones record portrait video.
    path = write_cat_video(tmp_path / "phone.mp4", seconds=1, fps=30, width=120, height=160, rotation=-90)
    with av.open(str(path)) as container:
        assert (container.streams.video[0].width, container.streams.video[0].height) == (160, 120)
    sampled = sample_frames(path, Sampling(num_frames=5))
    assert [frame.index for frame in sampled] == [0, 6, 12, 18, 24]
    for frame in sampled:
        assert frame.array.shape == (160, 120, 3)
        assert read_frame_index(frame.array) == frame.index


def test_a_video_shorter_than_asked_gives_every_frame_once(tmp_path: Path) -> None:
    path = write_cat_video(tmp_path / "short.mp4", seconds=0.2, fps=20)
    sampled = sample_frames(path, Sampling(num_frames=8))
    assert [frame.index for frame in sampled] == [0, 1, 2, 3]
    assert [read_frame_index(frame.array) for frame in sampled] == [0, 1, 2, 3]


def test_fps_strategy_takes_one_frame_per_interval(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264"])
    assert choose_positions(index, Sampling(num_frames=32, fps=2)) == [0, 15, 30, 45, 60, 75]
    assert choose_positions(index, Sampling(num_frames=3, fps=2)) == [0, 15, 30]


def test_fps_strategy_on_a_variable_frame_rate_follows_time(videos: dict[str, Path]) -> None:
    path = videos["vfr"]
    reference, times = _decode_everything(path)
    sampled = sample_frames(path, Sampling(num_frames=32, fps=4))
    expected: list[int] = []
    for j in range(32):
        at = next((i for i, t in enumerate(times) if t >= j * 0.25 - 1e-9), None)
        if at is None:
            break
        if not expected or expected[-1] != at:
            expected.append(at)
    assert [frame.index for frame in sampled] == expected
    for frame in sampled:
        assert np.array_equal(frame.array, reference[frame.index])


def test_window_restricts_the_frames(videos: dict[str, Path]) -> None:
    index = index_stream(videos["h264"])
    assert choose_positions(index, Sampling(num_frames=4, start=1.0, end=2.0)) == [30, 37, 44, 51]
    assert choose_positions(index, Sampling(num_frames=3, fps=1, start=0.5)) == [15, 45, 75]
    assert choose_positions(index, Sampling(num_frames=2, end=0.1)) == [0, 1]


@pytest.mark.parametrize(
    "window", [{"start": 10.0}, {"start": 3.5, "end": 9.0}, {"start": 1.01, "end": 1.02}, {"start": 2.99, "end": 2.995}]
)
def test_a_window_outside_the_video_is_a_bad_request(videos: dict[str, Path], window: dict[str, float]) -> None:
    with pytest.raises(InvalidRequest, match="holds no frames") as raised:
        sample_frames(videos["h264"], Sampling(num_frames=4, **window))
    assert raised.value.code == "invalid_request" and raised.value.http_status == 400


@pytest.mark.parametrize("kind", ["h264_bframes_long_gop", "vp9_webm_with_audio", "av1"])
def test_fast_mode_takes_the_nearest_keyframes_and_says_how_far(videos: dict[str, Path], kind: str) -> None:
    path = videos[kind]
    index = index_stream(path)
    reference, times = _decode_everything(path)
    keyframes = {index.position_of(pts) for pts in index.keyframe_pts}
    targets = choose_positions(index, Sampling(num_frames=6))
    sampled = sample_frames(path, Sampling(num_frames=6, fast=True))
    assert len({frame.index for frame in sampled}) == len(sampled)
    for frame in sampled:
        assert frame.index in keyframes
        assert np.array_equal(frame.array, reference[frame.index])
        assert frame.offset is not None
        target = min(targets, key=lambda t: abs(times[t] - (frame.time - frame.offset)))
        assert times[target] == pytest.approx(frame.time - frame.offset, abs=1e-6)
        # No keyframe is nearer to that target.
        assert abs(frame.offset) <= min(abs(times[k] - times[target]) for k in keyframes) + 1e-6


def test_files_that_are_not_video_are_invalid_media(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    with pytest.raises(InvalidMedia):
        sample_frames(text, Sampling())

    audio = tmp_path / "sound.m4a"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(InvalidMedia, match="no video stream"):
        sample_frames(audio, Sampling())

    truncated = tmp_path / "truncated.mp4"
    whole = write_cat_video(tmp_path / "whole.mp4", seconds=1)
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(InvalidMedia):
        sample_frames(truncated, Sampling())


def test_a_seek_that_lands_late_is_retried_from_the_keyframe_before(videos: dict[str, Path]) -> None:
    """As if the demuxer had landed on the next keyframe: its open GOP's leading frames are missed
    there and found from the keyframe before; a pts no frame has gets the next frame instead."""
    path = videos["h264_open_gop"]
    index = index_stream(path)
    reference, _ = _decode_everything(path)
    late = index.keyframe_pts[1]
    target = index.pts[index.position_of(late) - 2]
    found = decode_segments(path, index, [Segment(late, (target,))])
    assert found[target].pts == target
    assert np.array_equal(found[target].array, reference[index.position_of(target)])

    pipe = videos["mkv_to_pipe"]
    pipe_index = index_stream(pipe)
    absent = pipe_index.pts[3] + 1
    found = decode_segments(pipe, pipe_index, [Segment(pipe_index.pts[0], (absent,))])
    assert found[absent].pts == pipe_index.pts[4]


def test_split_keeps_the_largest_group_as_small_as_a_contiguous_split_allows() -> None:
    """Five seeks decoding 127, 125, 123, 121 and 47 frames over two processes: the slowest
    process sets the time, so the split is 252 | 291, not 375 | 168 or 294 | 81."""
    from fractions import Fraction
    from itertools import combinations

    from worker.media.sampling import StreamIndex, split_segments

    keyframes = [0, 128, 256, 384, 512]
    index = StreamIndex(pts=list(range(600)), keyframe_pts=keyframes, time_base=Fraction(1, 30))
    lasts = [126, 252, 378, 504, 558]
    segments = [Segment(k, (last,)) for k, last in zip(keyframes, lasts, strict=True)]
    costs = [last - k + 1 for k, last in zip(keyframes, lasts, strict=True)]

    groups = split_segments(index, segments, 2)

    assert [s for group in groups for s in group] == segments
    best = min(
        max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs)), strict=True))
        for cuts in combinations(range(1, len(costs)), 1)
    )
    largest = max(sum(costs[segments.index(s)] for s in group) for group in groups)
    assert largest == best == 291
    assert len(split_segments(index, segments, 8)) == 5
    assert split_segments(index, segments, 1) == [segments]
