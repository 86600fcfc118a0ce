"""The bundled Gemma 4 Unified model samples/gemma4-shapes and what made it: transformers loads it and gives our
Pipeline's greedy tokens on an image, a clip and a sound; it answers the held-out renderer's scenes; its training
packs questions without changing their loss, is seeded, and never sees the held-out renderer; the generators'
answers agree with plain-numpy readings of the pixels and samples.
"""
from __future__ import annotations

import colorsys
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gemma4_fixtures import all_frames
from pipeline import Pipeline, SamplingParams
from samples.beeps import PITCHES, SAMPLING_RATE, BeepMaker
from samples.evaluate_gemma4_shapes import DEFAULT_MODEL, EVAL_SEED, evaluate, examples_for, request_for
from samples.scenes import HUES, SceneMaker
from samples.scenes_heldout import TASKS, HeldoutScenes
from samples.shapes import COLORS, COUNT_WORDS, DIRECTIONS, SHAPES
from samples.train_gemma4_shapes import ALL_PROMPTS
from serve.chat import ChatTemplate

SMALL_N = 10
ANSWERS = {"color": set(COLORS), "shape": set(SHAPES), "count": set(COUNT_WORDS), "motion": set(DIRECTIONS),
           "beeps": set(COUNT_WORDS), "pitch": set(PITCHES)}
_THING = f"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
DESCRIPTION = re.compile(f"^{_THING}((, {_THING})* and {_THING})?$")


def _hf_inputs(processor, kind: str, question: str, medium, tmp_path):
    """transformers' own processing of one chat turn holding ``medium`` then ``question``."""
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text",
                                                                                       "text": question}]}],
                                         tokenize=False, add_generation_prompt=True)
    text = text.removeprefix("<bos>")  # the processor's tokenizer adds it (apply_chat_template would not)
    if kind == "image":
        return processor(text=text, images=[medium], return_tensors="pt")
    if kind == "audio":
        return processor(text=text, audio=[medium], return_tensors="pt")
    path = tmp_path / "clip.mp4"
    path.write_bytes(medium)
    frames, meta = all_frames(path)
    return processor(text=text, videos=[frames], videos_kwargs={"video_metadata": [meta]}, return_tensors="pt")


def _media_examples(seed: int):
    """(task, medium): an image, a clip and a sound from the held-out renderer."""
    gen = HeldoutScenes(seed)
    return [(task, gen.example(task)) for task in ("describe", "motion", "beeps")]


# the checkpoint

@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(str(DEFAULT_MODEL))


def test_it_is_what_loads_when_no_model_is_given():
    from pipeline.config import BUNDLED_MODEL, EngineConfig

    assert BUNDLED_MODEL == DEFAULT_MODEL and EngineConfig().model == str(DEFAULT_MODEL)
    from serve.cli import build_parser

    assert EngineConfig(model=build_parser().parse_args(["serve"]).model).model == str(DEFAULT_MODEL)


def test_checkpoint_files_and_size():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) <= 30 * 2**20


def test_transformers_loads_it_and_agrees_with_pipeline(pipe, tmp_path):
    from transformers import Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedProcessor

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    processor = Gemma4UnifiedProcessor.from_pretrained(DEFAULT_MODEL)
    template = ChatTemplate.from_pretrained(DEFAULT_MODEL)
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<turn|>")
    for task, medium in _media_examples(EVAL_SEED + 99):
        inputs = _hf_inputs(processor, medium.kind, ALL_PROMPTS[task], getattr(medium, medium.kind), tmp_path)
        request = request_for(medium, task, template)
        assert inputs["input_ids"][0].tolist() == pipe.engine.build_prompt(
            request["prompt"], request.get("images", ()), request.get("videos", ()), request.get("audios", ())
        ).token_ids
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        out = pipe.generate([request], SamplingParams(max_tokens=24, temperature=0.0))[0]
        assert out.token_ids == ref.tolist(), medium.kind
        assert out.finish_reason == "stop" and out.token_ids[-1] == end_of_turn  # the answer ends its turn
        assert processor.decode(ref, skip_special_tokens=True).strip() == out.text.strip()
    # the plain layout (media, then the question) ends at <eos>
    task, medium = _media_examples(EVAL_SEED + 98)[0]
    inputs = processor(text="<|image|>" + ALL_PROMPTS[task], images=[medium.image], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    out = pipe(ALL_PROMPTS[task], images=[medium.image], max_tokens=24, temperature=0.0)
    assert out.token_ids == ref.tolist() and out.token_ids[-1] == processor.tokenizer.eos_token_id


@pytest.mark.slow
def test_heldout_answers_are_well_formed_through_pipeline(pipe):
    """10 held-out examples per task through Pipeline: every answer ends its turn and is one of its task's
    answers ("a <color> <shape>, ... and a <color> <shape>" for describe). Accuracy is measured by
    samples/evaluate_gemma4_shapes.py (200 per task; the README's table)."""
    results = evaluate(pipe, SMALL_N, tasks=TASKS, template=ChatTemplate.from_pretrained(DEFAULT_MODEL),
                       max_mistakes=SMALL_N)
    for task, result in results.items():
        assert result.num_stopped == result.num_total, task
        for _, got in result.mistakes:
            assert (DESCRIPTION.match(got) if task == "describe" else got in ANSWERS[task]), (task, got)


# training

def _tiny_training_model():
    from transformers import Gemma4UnifiedForConditionalGeneration

    from samples.train_gemma4_shapes import TrainConfig, model_config, write_processor

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2)
    return cfg, model_config, write_processor, Gemma4UnifiedForConditionalGeneration


def test_training_packs_questions_without_changing_their_loss(tmp_path):
    """A still (chat turn), a still (plain layout), a clip and a sound, each packed with all its questions: each
    question's loss equals transformers' own loss for it alone, processed by Gemma4UnifiedProcessor (its pixel
    values, mask and positions), and another row beside it changes nothing."""
    from transformers import Gemma4UnifiedProcessor

    from samples.train_gemma4_shapes import Packer, answer_loss

    cfg, model_config, write_processor, model_class = _tiny_training_model()
    tok = write_processor(tmp_path)
    torch.manual_seed(0)
    model = model_class(model_config(cfg, tok)).eval()
    processor = Gemma4UnifiedProcessor.from_pretrained(tmp_path)
    packer = Packer(tmp_path)
    scenes = SceneMaker(EVAL_SEED + 3)
    items = [(scenes.annotated_scene(1), False), (scenes.annotated_scene(1), True), (scenes.annotated_clip(), False),
             (BeepMaker(EVAL_SEED + 4).annotated(), False)]
    with torch.no_grad():
        _, together = answer_loss(model, packer.collate(items[2:] + items[:1]))
        for medium, plain in items:
            _, per_task = answer_loss(model, packer.collate([(medium, plain)]))
            for task, answer in medium.answers.items():
                question = ALL_PROMPTS[task]
                if plain:
                    inputs = processor(text="<|image|>" + question, images=[medium.image], return_tensors="pt")
                    end = tok.token_to_id("<eos>")
                else:
                    inputs = _hf_inputs(processor, medium.kind, question, getattr(medium, medium.kind), tmp_path)
                    end = tok.token_to_id("<turn|>")
                answer_ids = torch.tensor([tok.encode(answer, add_special_tokens=False).ids + [end]])
                n = inputs["input_ids"].shape[1]
                inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], 1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                         torch.zeros_like(answer_ids)], 1)
                labels = inputs["input_ids"].clone()
                labels[:, :n] = -100
                ref = model(**inputs, labels=labels).loss.item()
                assert per_task[task] == pytest.approx(ref, abs=1e-5), (medium.kind, plain, task, per_task[task], ref)
                if not plain and medium.kind == "image" and task in ("count", "describe"):  # the clip asks color
                    assert together[task] == pytest.approx(per_task[task], abs=1e-5)


def test_training_script_is_seeded_and_writes_a_checkpoint_transformers_reads(tmp_path):
    """Four seeded steps (a still batch, a sound batch, a still batch, a clip batch), twice: the same weights;
    transformers' processor and model load the folder."""
    from safetensors.torch import load_file
    from transformers import Gemma4UnifiedForConditionalGeneration, Gemma4UnifiedProcessor

    from samples.train_gemma4_shapes import TrainConfig, step_kind, train

    cfg = TrainConfig(steps=4, stills_steps=0, image_batch_size=2, video_batch_size=1, audio_batch_size=2,
                      hidden_size=32, num_layers=2, num_heads=2, warmup_steps=1, threads=1)
    assert [step_kind(s, cfg) for s in range(4)] == ["image", "audio", "image", "clip"]
    for run in ("a", "b"):
        train(cfg, tmp_path / run)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(tmp_path / "a")
    assert model.config.text_config.hidden_size == 32
    assert Gemma4UnifiedProcessor.from_pretrained(tmp_path / "a").video_processor.num_frames == 4


def test_task_weights_and_starting_weights(tmp_path):
    """A weighted question counts that many times in the mean; start_weights sets the attention norms to
    head_dim ** -0.25, the post-attention / post-MLP norms to branch_scale, and unit-RMS embeddings."""
    import math

    from samples.train_gemma4_shapes import TrainConfig, start_weights
    from samples.training import question_losses

    logits, labels = torch.randn(5, 7), torch.tensor([1, 2, 3, 4, 5])
    qids, tasks = torch.tensor([0, 0, 1, 2, 2]), ["shape", "color", "shape"]
    token = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    per_q = torch.stack([token[:2].mean(), token[2], token[3:].mean()])
    plain, means = question_losses(logits, labels, qids, tasks)
    weighted, _ = question_losses(logits, labels, qids, tasks, {"shape": 4.0})
    assert torch.allclose(plain, per_q.mean())
    assert torch.allclose(weighted, (4 * per_q[0] + per_q[1] + 4 * per_q[2]) / 9)
    assert math.isclose(means["shape"], float(per_q[[0, 2]].mean()), rel_tol=1e-6)

    _, model_config, write_processor, model_class = _tiny_training_model()
    cfg = TrainConfig(hidden_size=64, num_layers=2, num_heads=2, branch_scale=0.3)
    model = model_class(model_config(cfg, write_processor(tmp_path)))
    start_weights(model, cfg)
    layer = model.model.language_model.layers[0]
    head_dim = layer.self_attn.head_dim
    assert torch.allclose(layer.self_attn.q_norm.weight, torch.full((head_dim,), head_dim ** -0.25))
    assert torch.all(layer.post_attention_layernorm.weight == 0.3)
    with torch.no_grad():
        scaled = model.model.language_model.embed_tokens(torch.arange(100))
    assert 0.8 < float(scaled.pow(2).mean().sqrt()) < 1.2


def test_training_never_imports_the_heldout_renderer():
    code = ("import sys, samples.train_gemma4_shapes, samples.make_media; "
            "assert 'samples.scenes_heldout' not in sys.modules, 'training imports the held-out renderer'")
    subprocess.run([sys.executable, "-c", code], check=True)


# the generators' answers, read back with plain numpy

def _beeps_and_peak(wave: np.ndarray) -> tuple[int, float]:
    """A plain short-time spectrum (20-ms Hann windows every 10 ms), 150-3000 Hz only (no hum, no low noise):
    beeps are runs of windows above half the loudest (gaps under 50 ms closed); the pitch is the strongest
    frequency of the loudest window."""
    win, hop = SAMPLING_RATE // 50, SAMPLING_RATE // 100
    starts = range(0, len(wave) - win + 1, hop)
    spectra = np.abs(np.fft.rfft(np.stack([wave[i:i + win] for i in starts]) * np.hanning(win), axis=1))
    freqs = np.fft.rfftfreq(win, 1 / SAMPLING_RATE)
    band = (freqs >= 150) & (freqs <= 3000)
    envelope = np.sqrt((spectra[:, band] ** 2).sum(1))
    runs, quiet = 0, 99
    for on in envelope > envelope.max() / 2:
        if on and quiet >= 5:
            runs += 1
        quiet = 0 if on else quiet + 1
    loudest = spectra[envelope.argmax()] * band
    return runs, float(freqs[loudest.argmax()])


@pytest.mark.parametrize("source", ["training", "heldout"])
def test_beep_answers_match_the_samples(source):
    if source == "training":
        maker = BeepMaker(7)
        sounds = [(m.audio, m.answers["beeps"], m.answers["pitch"]) for m in (maker.annotated() for _ in range(40))]
    else:
        gen = HeldoutScenes(7)
        sounds = [(m.audio, m.answers["beeps"], None) for m in (gen.example("beeps") for _ in range(40))]
        sounds += [(m.audio, None, m.answers["pitch"]) for m in (gen.example("pitch") for _ in range(40))]
    for wave, count, pitch in sounds:
        assert wave.dtype == np.float32 and 0.3 <= len(wave) / SAMPLING_RATE <= 3.0
        runs, peak = _beeps_and_peak(wave)
        if count is not None:
            assert COUNT_WORDS[runs - 1] == count
        if pitch is not None:
            lo, hi = PITCHES[pitch]
            assert lo * 0.9 <= peak <= hi * 1.1, (pitch, peak)


def _shape_hue(image) -> float:
    """Mean hue (degrees) of the saturated pixels far from the image's median colour: the shape, not the
    background."""
    pixels = np.asarray(image.convert("RGB"), np.float32).reshape(-1, 3)
    far = pixels[np.abs(pixels - np.median(pixels, axis=0)).sum(1) > 120] / 255
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in far[:: max(1, len(far) // 3000)]])
    hsv = hsv[hsv[:, 1] > 0.4]  # backgrounds are grey or lightly tinted
    angles = hsv[:, 0] * 2 * np.pi
    return float(np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360)


@pytest.mark.parametrize("source", ["training", "heldout"])
def test_color_answers_match_the_pixels(source):
    """The shape's hue is nearest to its colour name's among the six."""
    if source == "training":
        scenes = SceneMaker(11)
        pairs = [(m.image, m.answers["color"]) for m in (scenes.annotated_scene(1) for _ in range(30))]
    else:
        pairs = [(m.image, m.answers["color"]) for m in examples_for("color", 30, 11)]
    for image, color in pairs:
        hue = _shape_hue(image)
        nearest = min(HUES, key=lambda name: min(abs(hue - HUES[name]), 360 - abs(hue - HUES[name])))
        assert nearest == color, (color, hue)
