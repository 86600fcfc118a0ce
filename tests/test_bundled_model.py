"""The example Fuyu checkpoint samples/fuyu-shapes (the bundled model before samples/gemma4-shapes): transformers
loads it and agrees with our Pipeline, and it answers
fresh shape scenes (a new seed) through Pipeline and over HTTP.

Small samples get slack against the issue's targets (>= 95% color/shape, >= 90% count/motion; the full
figures, 200 scenes per task, come from samples/evaluate_shapes.py and are in the README): 20 scenes per
task must reach 17/20 (85%) for color/shape and 16/20 (80%) for count/motion, which a model at the target
fails less than 2% of the time (the scenes are seeded, so a given model passes or fails every time).
"""
from __future__ import annotations

import io
import re

import httpx
import pytest
import torch

from pipeline import Pipeline
from pipeline.config import FUYU_SHAPES_MODEL, EngineConfig
from samples.evaluate_shapes import EVAL_SEED, evaluate, examples_for, request_for
from samples.shapes import COLORS, PROMPTS, SHAPES
from tokenization import Interleaver

SMALL_N = 20
MIN_CORRECT = {"color": 17, "shape": 17, "count": 16, "motion": 16}
HTTP_MIN_CORRECT = {"color": 9, "shape": 9, "count": 8, "motion": 8}  # of 10
_THING = f"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
DESCRIPTION = re.compile(f"^{_THING}((, {_THING})* and {_THING})?$")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(str(FUYU_SHAPES_MODEL))


def test_checkpoint_files_and_size():
    names = {p.name for p in FUYU_SHAPES_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= names
    assert sum(p.stat().st_size for p in FUYU_SHAPES_MODEL.iterdir()) <= 30 * 2**20


def test_transformers_loads_it_and_agrees_with_pipeline(pipe):
    from transformers import FuyuForCausalLM, FuyuProcessor

    model = FuyuForCausalLM.from_pretrained(FUYU_SHAPES_MODEL, dtype=torch.float32).eval()
    processor = FuyuProcessor.from_pretrained(FUYU_SHAPES_MODEL)
    interleaver = Interleaver.from_pretrained(FUYU_SHAPES_MODEL)
    for task in ("color", "shape", "count", "describe"):
        ex = examples_for(task, 1, EVAL_SEED + 99)[0]
        inputs = processor(images=ex.image, text=ex.question, return_tensors="pt", return_legacy_image_output=False)
        assert inputs["input_ids"][0].tolist() == interleaver.build(ex.question, images=[ex.image]).token_ids
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        out = pipe(ex.question, images=[ex.image], max_tokens=24, temperature=0.0)
        assert out.token_ids == ref.tolist()
        assert out.finish_reason == "stop" and out.token_ids[-1] == processor.tokenizer.eos_token_id
        assert processor.decode(ref, skip_special_tokens=True).strip() == out.text


@pytest.mark.parametrize("task", ["color", "shape", "count", "motion"])
def test_small_evaluation_through_pipeline(pipe, task):
    result = evaluate(pipe, SMALL_N, tasks=(task,))[task]
    assert result.num_stopped == result.num_total  # every answer ends with EOS
    assert result.num_correct >= MIN_CORRECT[task], f"{task}: {result.num_correct}/{SMALL_N}, {result.mistakes}"


def test_describe_answers_are_well_formed(pipe):
    """No accuracy target in the issue: each answer is "a <color> <shape>, ... and a <color> <shape>"."""
    examples = examples_for("describe", SMALL_N, EVAL_SEED)
    outs = [pipe(**request_for(ex), max_tokens=24, temperature=0.0) for ex in examples]
    for out in outs:
        assert out.finish_reason == "stop" and DESCRIPTION.match(out.text), out.text


@pytest.mark.slow
def test_small_evaluation_over_http(pipe):
    """10 scenes per task over POST /v1/generate: the same answers as Pipeline, and each targeted task near
    its target (at least 9/10 for color and shape, 8/10 for count and motion)."""
    from serve.app import create_app
    from tests.server_fixtures import running_server

    with running_server(create_app(EngineConfig(model=str(FUYU_SHAPES_MODEL)))) as base_url:
        for task in ("color", "shape", "count", "describe", "motion"):
            examples = examples_for(task, 10, EVAL_SEED + 7)
            correct = 0
            for ex in examples:
                if ex.image is not None:
                    buf = io.BytesIO()
                    ex.image.save(buf, format="PNG")
                    files = {"image": ("scene.png", buf.getvalue(), "image/png")}
                else:
                    files = {"video": ("clip.mp4", ex.video, "video/mp4")}
                resp = httpx.post(base_url + "/v1/generate", data={"prompt": ex.question, "max_tokens": "24",
                                                                   "temperature": "0"}, files=files, timeout=60)
                assert resp.status_code == 200, resp.text
                body = resp.json()
                local = pipe(**request_for(ex), max_tokens=24, temperature=0.0)
                assert (body["text"], body["finish_reason"]) == (local.text, "stop")
                correct += body["text"].strip() == ex.answer
            if task in HTTP_MIN_CORRECT:
                assert correct >= HTTP_MIN_CORRECT[task], f"{task}: {correct}/10 over HTTP"


def test_training_packs_questions_without_changing_their_loss():
    """Training packs one medium with all its questions in a row, each question masked to see only the medium
    and itself. Each question's loss must equal transformers' own loss for that question alone, built by
    FuyuProcessor with the ordinary causal mask."""
    from transformers import FuyuConfig, FuyuForCausalLM

    from samples.random_checkpoint import IMAGE_TOKEN, make_processor
    from samples.shapes import SceneGenerator
    from samples.train_shapes import TrainConfig, answer_loss, collate, make_interleaver, model_config_kwargs, \
        patch_config

    cfg = TrainConfig(hidden_size=32, num_layers=2, num_heads=2)
    tok, interleaver = make_interleaver(cfg)
    torch.manual_seed(0)
    config = FuyuConfig(image_token_id=tok.token_to_id(IMAGE_TOKEN), **model_config_kwargs(cfg, tok.get_vocab_size()))
    model = FuyuForCausalLM(config).eval()
    gen = SceneGenerator(EVAL_SEED + 3)
    items = [gen.annotated_scene(1), gen.annotated_scene(3)]
    batch = collate(interleaver, items)
    assert batch.question_tasks == ["count", "describe", "color", "shape", "count", "describe"]
    with torch.no_grad():
        _, per_task = answer_loss(model, collate(interleaver, items[:1]), patch_config(cfg))
        _, both = answer_loss(model, batch, patch_config(cfg))

    processor = make_processor(tok, cfg.patch_size, cfg.image_side, cfg.image_side)
    item = items[0]
    for task, answer in item.answers.items():
        inputs = processor(images=item.image, text=PROMPTS[task], return_tensors="pt",
                           return_legacy_image_output=False)
        answer_ids = torch.tensor([tok.encode(answer).ids + [tok.token_to_id("</s>")]])
        n = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer_ids], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        labels = inputs["input_ids"].clone()
        labels[:, :n] = -100
        with torch.no_grad():
            ref = model(**inputs, labels=labels).loss.item()
        assert per_task[task] == pytest.approx(ref, abs=1e-5), task
    assert both["color"] == pytest.approx(per_task["color"], abs=1e-5)  # another row beside it changes nothing


def test_training_script_writes_a_checkpoint_transformers_reads(tmp_path):
    """Two seeded steps at patch 8 / 64x64 (a still batch, then a clip batch): transformers' processor tokenizes
    like our Interleaver, the config carries the patch size, and a second run gives the same weights."""
    from safetensors.torch import load_file
    from transformers import FuyuConfig, FuyuProcessor

    from samples.train_shapes import TrainConfig, train

    cfg = TrainConfig(steps=2, patch_size=8, image_side=64, image_batch_size=2, video_batch_size=1,
                      hidden_size=32, num_layers=1, num_heads=2, warmup_steps=1, stills_steps=0)
    for run in ("a", "b"):
        train(cfg, tmp_path / run)
    config = FuyuConfig.from_pretrained(tmp_path / "a")
    assert (config.patch_size, config.text_config.num_hidden_layers) == (8, 1)
    processor = FuyuProcessor.from_pretrained(tmp_path / "a")
    ex = examples_for("count", 1, EVAL_SEED + 5)[0]
    inputs = processor(images=ex.image, text=ex.question, return_tensors="pt", return_legacy_image_output=False)
    assert inputs["input_ids"][0].tolist() == Interleaver.from_pretrained(tmp_path / "a").build(
        ex.question, images=[ex.image]).token_ids
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["vision_embed_tokens.weight"].shape == (32, 8 * 8 * 3)
