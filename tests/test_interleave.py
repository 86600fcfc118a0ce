"""tokenization/interleave.py: ids and patches against FuyuProcessor; markers, videos, hashes, threads."""
from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import FuyuImageProcessor, FuyuProcessor

from encoders import PatchConfig, normalize_patches
from tests.test_video import make_clip
from tokenization import Interleaver, MediaSlot, TextTokenizer

skdata = pytest.importorskip("skimage.data")
RNG = np.random.default_rng(1)
PAIRS = [("What is in this picture?", skdata.astronaut()), ("", skdata.coffee()),
         ("Describe it.", skdata.chelsea()), ("émoji 😀 中文", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
         ("  spaces around  ", RNG.integers(0, 256, (100, 30, 3), dtype=np.uint8)),
         ("multi\nline\nprompt", RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
         ("<box>1, 2, 3, 4</box>", RNG.integers(0, 256, (9, 200, 3), dtype=np.uint8)),
         ("Numbers 0123456789", skdata.camera()), ("x" * 120, RNG.integers(0, 256, (65, 65, 3), dtype=np.uint8)),
         ("Caption:", RNG.integers(0, 256, (300, 17, 3), dtype=np.uint8)),
         ("Last one", RNG.integers(0, 256, (1, 1, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def interleaver(tiny_checkpoint):
    return Interleaver.from_pretrained(tiny_checkpoint)


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def _check_against(ref: FuyuProcessor, prompt, text: str, image) -> None:
    out = ref(images=image, text=text, return_legacy_image_output=False)
    ids = out["input_ids"][0]
    assert prompt.token_ids == ids.tolist()
    assert prompt.image_positions == (ids == ref.image_token_id).nonzero()[:, 0].tolist()
    got = normalize_patches(prompt.patches, PatchConfig.from_dict(ref.image_processor.to_dict()))
    assert got.shape == out["pixel_values"].shape
    assert (got - out["pixel_values"]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("text,image", PAIRS[:-1])
def test_one_image_no_marker_matches_fuyu_processor(interleaver, hf_processor, text, image):
    image = _rgb(image)
    _check_against(hf_processor, interleaver.build(text, images=[image]), text, image)


def test_fuyu_default_config_1080x1920_patch30(hf_processor):
    ref = FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=hf_processor.tokenizer)
    il = Interleaver(TextTokenizer(hf_processor.tokenizer.backend_tokenizer), PatchConfig())
    for image in (RNG.integers(0, 256, (1500, 2600, 3), dtype=np.uint8), skdata.astronaut()):
        _check_against(ref, il.build("What is this?", images=image), "What is this?", image)


# the reference loads paths with torchvision.io, which warns it is deprecated (transformers' choice, not ours)
@pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")
def test_files_as_fuyu_processor_loads_them(interleaver, hf_processor, tmp_path):
    """Same path to both: decode (EXIF, alpha) + patchify + ids agree with FuyuProcessor's own loading."""
    rgba = RNG.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    rgba[:25, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(skdata.coffee()).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        path = str(tmp_path / name)
        _check_against(hf_processor, interleaver.build("hi", images=[path]), "hi", path)


def test_markers_place_media(interleaver):
    tok, img = interleaver.tokenizer, RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    image_ids = ([tok.image_token_id] * 3 + [tok.newline_token_id]) * 2
    p = interleaver.build("Compare <image> with <image>", images=[img, img[:8]])
    assert p.token_ids == ([tok.bos_token_id] + tok.encode("Compare ") + image_ids + tok.encode(" with ")
                           + image_ids[:4] + [tok.boa_token_id])
    assert [(s.start, s.end, s.kind) for s in p.media] == [(len(tok.encode("Compare ")) + 1,
                                                            len(tok.encode("Compare ")) + 9, "image"),
                                                           (p.token_ids.index(tok.boa_token_id) - 4,
                                                            p.token_ids.index(tok.boa_token_id), "image")]
    assert p.patches.shape == (9, 8 * 8 * 3)
    assert interleaver.build("<image>\nWhat?", images=[img]).token_ids == \
        interleaver.build("What?", images=[img]).token_ids
    assert interleaver.build("text only").token_ids == [tok.bos_token_id] + tok.encode("text only<0x04>")


def test_marker_count_mismatch_and_reserved_tokens(interleaver):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="2 <image> marker"):
        interleaver.build("<image> and <image>", images=[img])
    with pytest.raises(ValueError, match="0 <image> marker"):
        interleaver.build("<video>", images=[img])
    with pytest.raises(ValueError, match="1 <video> marker"):
        interleaver.build("<video>")
    with pytest.raises(ValueError, match="must not contain"):
        interleaver.build("sneaky |SPEAKER|", images=[img])


def test_video_frames_with_timestamps(interleaver):
    tok = interleaver.tokenizer
    p = interleaver.build("What happens? <video>", videos=make_clip(seconds=1.0))
    (span,) = p.media
    assert span.kind == "video" and p.token_ids[span.end] == tok.boa_token_id
    frame_ids = ([tok.image_token_id] * 8 + [tok.newline_token_id]) * 4  # 64x128 -> 32x64 -> 4x8 patches
    expected = []
    for i in range(8):  # the frame shown at each of 8 segment centres of 1 s at 30 fps
        t = int((i + 0.5) / 8 * 30) / 30
        expected += tok.encode(f"<t={t:.1f}s>") + frame_ids
    assert p.token_ids[span.start:span.end] == expected
    assert p.patches.shape[0] == 8 * 32 == len(p.image_positions)


def test_content_hash_is_of_pixels(interleaver, tmp_path):
    photo = skdata.astronaut()
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    (tmp_path / "p.png").write_bytes(buf.getvalue())
    hashes = {interleaver.build("", images=[src]).media[0].content_hash
              for src in (photo, buf.getvalue(), tmp_path / "p.png", Image.fromarray(photo))}
    assert len(hashes) == 1
    other = photo.copy()
    other[300, 300, 0] ^= 0xFF
    assert interleaver.build("", images=[other]).media[0].content_hash not in hashes


def test_build_is_thread_safe(interleaver):
    jobs = [(text, _rgb(image)) for text, image in PAIRS]
    serial = [interleaver.build(t, images=[i]) for t, i in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: interleaver.build(job[0], images=[job[1]]), jobs * 3))
    for a, b in zip(serial * 3, parallel):
        assert a.token_ids == b.token_ids and torch.equal(a.patches, b.patches) and a.media == b.media


def test_prompt_over_the_context_is_refused_before_decoding(tiny_checkpoint, monkeypatch):
    il = Interleaver.from_pretrained(tiny_checkpoint)
    tok = il.tokenizer
    clip = make_clip(seconds=1.0)
    exact = il.build("What happens? <video>", videos=clip)
    n = len(exact.token_ids)
    limited = Interleaver.from_pretrained(tiny_checkpoint, max_prompt_tokens=n)
    assert limited.build("What happens? <video>", videos=clip).token_ids == exact.token_ids
    text_len = len(tok.encode("x " * 50)) + 2
    with pytest.raises(ValueError, match=rf"at least {text_len} tokens; the model's context \(max_model_len\) is 10"):
        Interleaver.from_pretrained(tiny_checkpoint, max_prompt_tokens=10).build("x " * 50)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a video whose prompt cannot fit")

    monkeypatch.setattr("encoders.video.VideoReader.decode", no_decoding)
    # 8 frames of >= 1 timestamp id + 64x128 -> 32x64: 4x8 patches and 4 newlines (rotated: 8x4, more)
    bound = 1 + len(tok.encode("What happens? ")) + 1 + 8 * (1 + 4 * 9)
    assert bound <= n
    tight = Interleaver.from_pretrained(tiny_checkpoint, max_prompt_tokens=bound - 1)
    context = rf"the model's context \(max_model_len\) is {bound - 1}"
    with pytest.raises(ValueError, match=rf"at least {bound} tokens; {context}"):
        tight.build("What happens? <video>", videos=clip)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Interleaver.from_pretrained(tiny_checkpoint, max_prompt_tokens=0)


# a 4K clip through the bundled model's interleaver (frames fit 64x64) in a fresh process; its peak RSS
# from /proc (VmHWM is per address space; ru_maxrss would start from the forking parent's RSS)
_PEAK_SCRIPT = """
import sys
from encoders import VideoSampling
from tokenization import Interleaver
il = Interleaver.from_pretrained("samples/fuyu-shapes", video_sampling=VideoSampling(num_frames=16))
data = open(sys.argv[1], "rb").read()
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = status("VmHWM")
prompt = il.build("<video>", videos=[data])
print(status("VmHWM") - before, prompt.patches.shape[0])
"""


def _clip_4k(num_frames: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=num_frames, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 3840, 2160, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.full((2160, 3840, 3), 90, np.uint8), format="rgb24")
        for _ in range(num_frames):
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc")
def test_4k_video_is_never_held_at_full_resolution(tmp_path):
    (tmp_path / "4k.mp4").write_bytes(_clip_4k(16))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "4k.mp4")], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, timeout=300)
    assert out.returncode == 0, out.stderr
    peak_growth, num_patches = map(int, out.stdout.split())
    assert num_patches == 16 * 5 * 8  # 2160x3840 -> 36x64 -> 5x8 patches a frame
    full_frame = 3840 * 2160 * 3
    assert peak_growth < 16 * full_frame  # today's full-resolution stack alone was twice this


def test_segments_place_media_structurally(interleaver):
    tok, img = interleaver.tokenizer, RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    marked = interleaver.build("Compare <image> with <image>", images=[img, img[:8]])
    segmented = interleaver.build(["Compare ", MediaSlot("image"), " with ", MediaSlot("image")], images=[img, img[:8]])
    assert segmented.token_ids == marked.token_ids and torch.equal(segmented.patches, marked.patches)
    assert segmented.media == marked.media
    literal = "In HTML, what does the <image> tag do?"
    assert interleaver.build([literal]).token_ids == [tok.bos_token_id] + tok.encode(literal + "<0x04>")
    with_image = interleaver.build([MediaSlot("image"), literal], images=[img])
    image_ids = ([tok.image_token_id] * 3 + [tok.newline_token_id]) * 2
    assert with_image.token_ids == image_ids + [tok.bos_token_id] + tok.encode(literal + "<0x04>")
    assert interleaver.build([MediaSlot("image"), "What is it?"], images=[img]).token_ids == \
        interleaver.build("What is it?", images=[img]).token_ids  # FuyuProcessor's ids
    assert interleaver.build(["", MediaSlot("image"), ""], images=[img]).token_ids == \
        interleaver.build("<image>", images=[img]).token_ids


def test_bad_segments(interleaver):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="0 image slot"):
        interleaver.build(["<image>"], images=[img])  # text is never a marker
    with pytest.raises(ValueError, match="1 video slot"):
        interleaver.build([MediaSlot("video")])
    with pytest.raises(ValueError, match="str and MediaSlot"):
        interleaver.build(["a", 3])
    with pytest.raises(ValueError, match="must not contain"):
        interleaver.build(["sneaky |SPEAKER|"])
    with pytest.raises(ValueError, match="MediaSlot.kind"):
        MediaSlot("sound")
    with pytest.raises(ValueError, match="not audio"):
        interleaver.build(["hear ", MediaSlot("audio")])
