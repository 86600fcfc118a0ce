"""Audio: PyAV decoding (``encoders/audio.py``) and the Gemma 4 Unified audio layout against transformers'
``Gemma4UnifiedProcessor`` (its ``Gemma4UnifiedAudioFeatureExtractor``)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from encoders import MediaError
from encoders.audio import AudioLimits, load_audio, sniff_format
from gemma4_fixtures import gemma4_folder, gemma4_layout, gemma4_processor, write_clip  # noqa: F401


def _encode(wave: np.ndarray, rate: int, fmt: str, codec: str, layout: str = "mono") -> bytes:
    """float32 [channels, samples] -> an audio file written by PyAV."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        sample_fmt = "s16" if codec == "pcm_s16le" else "fltp"
        data = (wave * 32767).astype(np.int16).reshape(1, -1, order="F") if sample_fmt == "s16" else wave
        frame = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout=layout)
        frame.rate = rate
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            container.mux(packet)
    return buf.getvalue()


def _sine(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * (300 + 200 * c) * t) for c in range(channels)]).astype(np.float32)


@pytest.mark.parametrize("num_samples", [1, 639, 640, 641, 32_123])
def test_audio_matches_processor(gemma4_processor, gemma4_layout, num_samples):
    wave = np.random.default_rng(num_samples).standard_normal(num_samples).astype(np.float32)
    other = np.random.default_rng(1).standard_normal(2000).astype(np.float32)
    ref = gemma4_processor(text="Hear <|audio|> and <|audio|>.", audio=[wave, other], return_tensors="pt")
    ours = gemma4_layout.build("Hear <audio> and <audio>.", audios=[wave, other])
    assert ours.token_ids == ref["input_ids"][0].tolist()
    assert ours.token_types == ref["mm_token_type_ids"][0].tolist()
    assert torch.equal(ours.audio_rows, ref["input_features"][ref["input_features_mask"]])
    assert ours.num_audio_tokens == -(-num_samples // 640) + 1 + 2000 // 640
    assert ours.bidirectional_spans == [] and [m.kind for m in ours.media] == ["audio", "audio"]


def test_audio_without_marker_goes_after_text(gemma4_processor, gemma4_layout):
    wave = _sine(16_000, 0.3)[0]
    assert gemma4_layout.build("", audios=[wave]).token_ids == \
        gemma4_processor(audio=[wave], return_tensors="pt")["input_ids"][0].tolist()
    ref = gemma4_processor(text="Transcribe this:<|audio|>", audio=[wave], return_tensors="pt")
    assert gemma4_layout.build("Transcribe this:", audios=[wave]).token_ids == ref["input_ids"][0].tolist()


def test_wav_16k_mono_is_exact():
    wave = _sine(16_000, 0.5)
    data = _encode(wave, 16_000, "wav", "pcm_s16le")
    assert sniff_format(data) == "wav"
    expected = (wave[0] * 32767).astype(np.int16).astype(np.float32) / 32768
    np.testing.assert_array_equal(load_audio(data, 16_000), expected)


@pytest.mark.parametrize("fmt,codec,suffix", [("wav", "pcm_s16le", "wav"), ("flac", "flac", "flac"),
                                              ("mp3", "libmp3lame", "mp3"), ("ogg", "libopus", "ogg"),
                                              ("webm", "libopus", "matroska"), ("mp4", "aac", "mp4"),
                                              ("adts", "aac", "aac")])
def test_formats_resampled_to_16k_mono(tmp_path, fmt, codec, suffix):
    rate = 48_000 if codec == "libopus" else 44_100
    data = _encode(_sine(rate, 1.0, channels=2), rate, fmt, codec, layout="stereo")
    assert sniff_format(data) == suffix
    path = tmp_path / f"clip.{fmt}"
    path.write_bytes(data)
    for src in (data, path, io.BytesIO(data)):
        wave = load_audio(src, 16_000)
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(wave.size - 16_000) <= 2_000  # encoder padding / priming
        assert 0.2 < float(np.sqrt(np.mean(wave[2_000:14_000] ** 2))) < 0.5  # the two sines, downmixed


def test_audio_track_of_a_video(tmp_path, gemma4_layout):
    path = write_clip(tmp_path / "with_audio.mp4", 24, 12, audio_rate=44_100)
    wave = load_audio(path, 16_000)
    assert abs(wave.size - 32_000) <= 2_000
    prompt = gemma4_layout.build("<audio>", audios=[path])
    assert prompt.num_audio_tokens == -(-wave.size // 640)


def test_bad_audio(tmp_path):
    with pytest.raises(MediaError, match="not a supported audio file"):
        load_audio(b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n")
    with pytest.raises(MediaError, match="not a supported audio file"):
        load_audio(b"ffconcat version 1.0\nfile /etc/passwd\n")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load_audio(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(MediaError, match="no audio stream"):
        load_audio(write_clip(tmp_path / "silent.mp4", 6, 12))
    long = _encode(_sine(16_000, 3.0), 16_000, "wav", "pcm_s16le")
    with pytest.raises(MediaError, match="limit is 2 s"):
        load_audio(long, 16_000, AudioLimits(max_audio_duration_s=2.0))
    with pytest.raises(MediaError, match="limit is"):
        load_audio(long, 16_000, AudioLimits(max_audio_bytes=1000))
    with pytest.raises(MediaError, match="empty"):
        load_audio(b"")
    with pytest.raises(ValueError, match="positive"):
        AudioLimits(max_audio_duration_s=0)
