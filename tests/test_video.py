"""encoders/video.py on clips encoded here with PyAV; each frame carries its index as 8 black/white blocks."""
from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from encoders import MediaError, MediaLimits, VideoSampling, load_video

W, H, BLOCK = 128, 64, 16


def _frame(i: int) -> np.ndarray:
    a = np.full((H, W, 3), 60, np.uint8)
    for bit in range(8):
        if (i >> bit) & 1:
            a[:32, bit * BLOCK:(bit + 1) * BLOCK] = 255
    a[48:, :16] = (255, 0, 0)  # bottom-left red marker (for rotation)
    return a


def _index(frame: torch.Tensor) -> int:
    blocks = frame[4:28].float().mean(dim=(0, 2)).reshape(8, BLOCK)[:, 4:12].mean(dim=1)  # [8]
    return sum(1 << b for b in range(8) if blocks[b] > 160)


def make_clip(codec="libx264", fmt="mp4", seconds=2.0, fps=30, gop=30, rotation=None, pts=None) -> bytes:
    """Encode ``seconds * fps`` frames (or one per entry of ``pts``, in 1/1000 s) into ``fmt``."""
    buf = io.BytesIO()
    count = len(pts) if pts is not None else int(seconds * fps)
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.gop_size = gop
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(_frame(i % 256), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("codec,fmt", [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mpeg4", "mp4"),
                                       ("libx264", "matroska"), ("libx264", "mov"), ("libsvtav1", "mp4")])
def test_codecs_give_the_frame_shown_at_each_time(codec, fmt):
    video = load_video(make_clip(codec, fmt), VideoSampling(num_frames=4))
    assert video.frames.shape == (4, H, W, 3) and video.frames.dtype == torch.uint8
    targets = [0.25, 0.75, 1.25, 1.75]  # centres of 4 equal segments of 2 s
    for frame, t, target in zip(video.frames, video.timestamps_s, targets):
        assert _index(frame) == int(target * 30)  # last frame with pts <= target
        assert t == pytest.approx(int(target * 30) / 30, abs=1e-3)


def test_sparse_sampling_of_a_long_clip_seeks():
    clip = make_clip(seconds=60, fps=30, gop=60)  # 1800 frames, a keyframe every 2 s
    video = load_video(clip, VideoSampling(num_frames=8))
    assert video.num_decoded < 0.25 * 1800
    for frame, t in zip(video.frames, video.timestamps_s):
        assert _index(frame) == round(t * 30) % 256
    assert video.timestamps_s[0] == pytest.approx(int(3.75 * 30) / 30, abs=1e-3)


def test_fps_sampling_and_cap(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(make_clip(seconds=2, fps=30))
    video = load_video(path, VideoSampling(fps=2))
    assert video.timestamps_s == pytest.approx([0.0, 0.5, 1.0, 1.5], abs=1e-3)
    assert [_index(f) for f in video.frames] == [0, 15, 30, 45]
    capped = load_video(str(path), VideoSampling(fps=30, max_frames=5))
    assert len(capped.timestamps_s) == 5  # 60 requested, spread uniformly instead
    with open(path, "rb") as f:
        assert torch.equal(load_video(f, VideoSampling(fps=2)).frames, video.frames)


def test_variable_frame_rate_uses_pts():
    pts = [0, 40, 80, 500, 520, 1200, 1900, 1950]  # ms
    video = load_video(make_clip("libx264", "matroska", pts=pts, gop=4), VideoSampling(fps=2, max_frames=8))
    # times 0, .5, 1, 1.5: frames shown then are the ones at 0, 500, 520, 1200 ms
    assert video.timestamps_s == pytest.approx([0.0, 0.5, 0.52, 1.2], abs=2e-3)
    assert [_index(f) for f in video.frames] == [0, 3, 4, 5]


def test_rotation_applied():
    video = load_video(make_clip(rotation=90, seconds=0.5), VideoSampling(num_frames=1))
    assert video.frames.shape == (1, W, H, 3)  # 90 degrees counterclockwise
    red = video.frames[0, :, :, 0].float() - video.frames[0, :, :, 1].float()
    assert red[-16:, 48:].mean() > 150  # bottom-left marker moved to bottom-right


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def test_bad_videos_raise_media_error():
    from PIL import Image

    clip = make_clip()
    with pytest.raises(MediaError, match="no video stream"):
        load_video(_audio_only())
    with pytest.raises(MediaError, match="truncated"):
        load_video(clip[: len(clip) // 2])
    with pytest.raises(MediaError, match="not a readable video"):
        load_video(b"\x00" * 5000)
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, "PNG")
    with pytest.raises(MediaError, match="image, not a video"):
        load_video(png.getvalue())


def test_limits():
    clip = make_clip()
    with pytest.raises(MediaError, match="2.0 s long; the limit is 1 s"):
        load_video(clip, limits=MediaLimits(max_video_duration_s=1))
    with pytest.raises(MediaError, match="128x64 pixels"):
        load_video(clip, limits=MediaLimits(max_video_pixels=1000))
    with pytest.raises(MediaError, match="the limit is"):
        load_video(clip, limits=MediaLimits(max_video_bytes=100))
    with pytest.raises(MediaError, match="asked for 8 frames"):
        load_video(clip, limits=MediaLimits(max_video_frames=4))
    with pytest.raises(ValueError, match="num_frames"):
        VideoSampling(num_frames=0)


@pytest.fixture
def server_dir(tmp_path, monkeypatch):
    """A working directory holding a real clip, an HLS segment and a FIFO that the upload names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(make_clip(seconds=1.0))
    (tmp_path / "seg.ts").write_bytes(make_clip(fmt="mpegts", seconds=1.0))
    os.mkfifo(tmp_path / "fifo.mp4")
    return tmp_path


@contextlib.contextmanager
def _watch_fifo(path):
    """Yields a list that gets True if anyone opens ``path`` for reading; the writer closes at once (EOF)."""
    opened, stop = [], threading.Event()

    def writer():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
            except OSError:
                time.sleep(0.001)
                continue
            opened.append(True)
            os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield opened
    finally:
        stop.set()
        thread.join()


def _playlist(segment: str) -> bytes:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{segment}\n#EXT-X-ENDLIST\n".encode()


@pytest.mark.parametrize("name", ["clip.mp4", "{dir}/clip.mp4", "fifo.mp4", "{dir}/fifo.mp4"])
def test_ffconcat_upload_reads_no_server_file(server_dir, name):
    upload = f"ffconcat version 1.0\nfile {name.format(dir=server_dir)}\n".encode()
    with _watch_fifo(server_dir / "fifo.mp4") as opened:
        for src in (upload, io.BytesIO(upload)):
            with pytest.raises(MediaError, match="not a readable video"):
                load_video(src)
        (server_dir / "list.ffconcat").write_bytes(upload)
        with pytest.raises(MediaError, match="not a readable video"):
            load_video(server_dir / "list.ffconcat")
    assert not opened


@pytest.mark.parametrize("segment", ["seg.ts", "{dir}/seg.ts", "file:{dir}/seg.ts", "fifo.mp4"])
def test_hls_playlist_reads_no_server_file(server_dir, segment):
    playlist = _playlist(segment.format(dir=server_dir))
    (server_dir / "up.m3u8").write_bytes(playlist)  # a path with the .m3u8 name FFmpeg's HLS probe wants
    with _watch_fifo(server_dir / "fifo.mp4") as opened:
        for src in (playlist, server_dir / "up.m3u8", "up.m3u8"):
            with pytest.raises(MediaError, match="not a readable video"):
                load_video(src)
    assert not opened


def test_concat_url_is_not_a_protocol(server_dir):
    for src in ("concat:clip.mp4|clip.mp4", b"concat:clip.mp4|clip.mp4", f"concat:{server_dir}/clip.mp4"):
        with pytest.raises(MediaError):
            load_video(src)
    assert load_video("clip.mp4").frames.shape[0] == 8  # the same file given as a path is fine


def test_frames_resized_as_decoded_equal_the_picture_resized_by_patchify():
    from encoders import PatchConfig, patchify

    cfg = PatchConfig(target_height=24, target_width=40, patch_size=8)  # 64x128 -> 20x40
    clip = make_clip(seconds=1.0)
    full = load_video(clip, VideoSampling(num_frames=4))
    small = load_video(clip, VideoSampling(num_frames=4), frame_size=cfg.resized_size)
    assert small.frames.shape == (4, 20, 40, 3) and small.timestamps_s == full.timestamps_s
    for big, resized in zip(full.frames, small.frames):
        assert torch.equal(patchify(big, cfg).data, patchify(resized, cfg).data)  # the frame as an image
    same = load_video(clip, VideoSampling(num_frames=4), frame_size=PatchConfig(64, 128, 8).resized_size)
    assert torch.equal(same.frames, full.frames)  # already small: untouched


def test_frame_size_sees_the_rotated_frame():
    sizes = []
    video = load_video(make_clip(rotation=90, seconds=0.5), VideoSampling(num_frames=2),
                       frame_size=lambda h, w: sizes.append((h, w)) or (h // 2, w // 2))
    assert sizes[0] == (W, H) and video.frames.shape == (2, W // 2, H // 2, 3)


def _num_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_decoder_threads_budget():
    clip = make_clip(seconds=1.0)
    for n in (1, 3):
        before, during = _num_threads(), []
        load_video(clip, VideoSampling(decoder_threads=n),
                   frame_size=lambda h, w: during.append(_num_threads()) or (h, w))
        if n == 1:
            assert max(during) == before  # neither the decoder nor swscale starts a thread
        else:
            assert max(during) >= before + n - 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="decoder_threads"):
            VideoSampling(decoder_threads=bad)
