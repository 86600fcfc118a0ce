"""fusionserve workers behind NVIDIA Dynamo's frontend, on loopback (serve/dynamo/).

One frontend (KV router, ``--migration-limit``) and two aggregated workers are shared by the module; the
reference is ``fusionserve serve`` on the same checkpoint (a real uvicorn server), asked the same questions
through the same ``openai`` client. Every process runs with ``HOME`` in a temporary folder and is stopped at
the end. Skipped only when ai-dynamo is not installed (``make dynamo``; ``make test`` installs it)."""
from __future__ import annotations

import base64
import json
import shutil
import threading
import time

import httpx
import pytest

pytest.importorskip("dynamo.common.backend", reason="ai-dynamo 1.6.1 is not installed (make dynamo)")

from openai import BadRequestError, OpenAI  # noqa: E402

from pipeline.config import EngineConfig  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.dynamo.launch import Cluster  # noqa: E402
from serve.protocol import ServerConfig  # noqa: E402
from server_fixtures import png_bytes, running_server  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "tiny-fuyu"
ENGINE = {"num_blocks": 96, "block_size": 16, "max_num_seqs": 8}
WORKER_ARGS = ("--torch-threads", "1", "--media-workers", "1", "--num-blocks", "96", "--block-size", "16",
               "--max-num-seqs", "8")
# renders image parts where they are (our ChatTemplate gives the template the parts: it loops over content)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {% else %}Assistant: {% endif %}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
            "{% if part['type'] == 'text' %}{{ part['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
            "\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a chat template (Dynamo's frontend refuses a model without one)."""
    folder = tmp_path_factory.mktemp("dynamo") / NAME
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint):
    with running_server(create_app(EngineConfig(model=str(checkpoint), **ENGINE), ServerConfig())) as url:
        yield OpenAI(base_url=url + "/v1", api_key="none", timeout=120)


@pytest.fixture(scope="module")
def cluster(checkpoint, tmp_path_factory):
    with Cluster(str(checkpoint), num_workers=2, served_model_name=NAME, worker_args=WORKER_ARGS,
                 frontend_args=("--migration-limit", "3"), workdir=tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return OpenAI(base_url=cluster.url + "/v1", api_key="none", timeout=120)


def image_url(seed: int = 0, width: int = 24, height: int = 16) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def image_question(text_before: str, url: str, text_after: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text_before},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text_after}]}]


def answer(client: OpenAI, model: str, messages: list[dict], max_tokens: int = 12, stream: bool = False):
    """(text, prompt tokens, completion tokens, finish reason) at temperature 0."""
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens, \
            r.choices[0].finish_reason
    text, usage, finish = "", None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage.prompt_tokens, usage.completion_tokens, finish


def reference_model(reference: OpenAI) -> str:
    return reference.models.list().data[0].id


QUESTIONS = [
    [{"role": "user", "content": "Tell me a story about a blue square and a red circle."}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
     {"role": "user", "content": "What is the colour of the sky?"}],
    image_question("What is", image_url(1), " in this picture?"),
    image_question("", image_url(2, 40, 30), "Describe it."),
]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("question", range(len(QUESTIONS)))
def test_answers_are_fusionserve_serves(client, reference, question, stream):
    got = answer(client, NAME, QUESTIONS[question], stream=stream)
    want = answer(reference, reference_model(reference), QUESTIONS[question], stream=stream)
    assert got == want
    assert got[2] == 12 and got[3] == "length"


def test_bad_media_and_overlong_prompts_are_400s_and_the_workers_go_on(client, reference):
    broken = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    with pytest.raises(BadRequestError) as exc:
        answer(client, NAME, image_question("What is", broken, "?"))
    assert "image" in str(exc.value).lower()
    with pytest.raises(BadRequestError):
        answer(client, NAME, [{"role": "user", "content": "many words " * 1500}])  # over max_model_len 2048
    question = QUESTIONS[0]
    assert answer(client, NAME, question) == answer(reference, reference_model(reference), question)


def metric(cluster: Cluster, name: str) -> list[float]:
    return [cluster.metric(worker, name) for worker in cluster.workers]


def wait_for(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_shared_image_and_prefix_route_to_the_worker_that_holds_them(client, cluster):
    url = image_url(7, 32, 24)
    prefix = "Look closely at the picture and answer in one short sentence, please, without any fuss. " * 3
    questions = [image_question("Question about", url, f" {prefix} Question {i}: what is it?") for i in range(8)]
    queried, hits = metric(cluster, "fusionserve_prefix_cache_query_tokens"), \
        metric(cluster, "fusionserve_prefix_cache_hit_tokens")
    stored = metric(cluster, "fusionserve_kv_events_stored")
    answer(client, NAME, questions[0], max_tokens=2)
    # the first worker published its blocks (the router hears them over the event plane)
    assert wait_for(lambda: metric(cluster, "fusionserve_kv_events_stored") != stored)
    time.sleep(0.5)
    for q in questions[1:]:
        answer(client, NAME, q, max_tokens=2)
    queried_after = metric(cluster, "fusionserve_prefix_cache_query_tokens")
    hits_after = metric(cluster, "fusionserve_prefix_cache_hit_tokens")
    served = [after > before for before, after in zip(queried, queried_after)]
    assert served.count(True) == 1, (queried, queried_after)
    holder = served.index(True)
    new_queries = queried_after[holder] - queried[holder]
    new_hits = hits_after[holder] - hits[holder]
    prompt_tokens = new_queries / 8
    # after the first, each request finds the image and the shared text (all but its last blocks) cached
    assert new_hits >= 7 * (prompt_tokens - 3 * 16), (new_hits, prompt_tokens)


def test_a_dropped_stream_is_aborted_and_frees_its_blocks(client, cluster):
    stream = client.chat.completions.create(model=NAME, messages=QUESTIONS[0], max_tokens=1000, temperature=0,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_for(lambda: metric(cluster, "fusionserve_requests_running") == [0, 0])
    assert metric(cluster, "fusionserve_kv_blocks_used") == [0, 0]


@pytest.fixture(scope="module")
def disagg_client(checkpoint, tmp_path_factory):
    """A second deployment: one prefill worker and one decode worker (KV over torch.distributed, gloo)."""
    with Cluster(str(checkpoint), num_workers=1, disagg=True, served_model_name=NAME, worker_args=WORKER_ARGS,
                 workdir=tmp_path_factory.mktemp("disagg")) as c:
        yield c, OpenAI(base_url=c.url + "/v1", api_key="none", timeout=120)


@pytest.mark.parametrize("question", [0, 2])
def test_prefill_and_decode_workers_give_the_aggregated_answer(disagg_client, reference, question):
    cluster, client = disagg_client
    prefill, decode = cluster.workers
    hits = cluster.metric(decode, "fusionserve_prefix_cache_hit_tokens")
    prefilled = cluster.metric(prefill, "fusionserve_prefix_cache_query_tokens")
    got = answer(client, NAME, QUESTIONS[question], max_tokens=16)
    assert got == answer(reference, reference_model(reference), QUESTIONS[question], max_tokens=16)
    assert cluster.metric(prefill, "fusionserve_prefix_cache_query_tokens") - prefilled == got[1]
    # the decode worker found the prompt's full blocks in its cache: the prefill's, transferred
    assert cluster.metric(decode, "fusionserve_prefix_cache_hit_tokens") - hits == got[1] // 16 * 16 > 0


def test_killing_a_worker_under_load_leaves_the_other_serving(client, cluster):
    """The frontend (--migration-limit 3) moves the dead worker's requests to the live one, which goes on after
    the answer so far (not from scratch): every request ends with all its tokens, and the frontend keeps
    answering. (The answers after the move are not compared with unbroken ones: the live worker computes the
    moved tokens' KV in one prefill, the dead one computed them one decode step at a time, and the random test
    model's near-tied logits may then pick another token.)"""
    results, errors, progress = {}, [], dict.fromkeys(range(4), 0)
    questions = [image_question(f"Request {i}:", image_url(i), " what is it?") for i in range(4)]

    def ask(i: int):
        try:
            usage, finish = None, None
            for chunk in client.chat.completions.create(model=NAME, messages=questions[i], max_tokens=300,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}):
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    progress[i] += bool(choice.delta.content)
                    finish = choice.finish_reason or finish
            results[i] = (usage.completion_tokens, finish)
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # kill the busier worker once answers are streaming (the moved requests then carry an answer so far)
    assert wait_for(lambda: min(progress.values()) >= 3)
    running = metric(cluster, "fusionserve_requests_running")
    victim = cluster.workers[running.index(max(running))]
    survivor = next(w for w in cluster.workers if w is not victim)
    cluster.kill(victim)
    for t in threads:
        t.join(180)
    assert errors == [] and len(results) == 4
    assert all(r == (300, "length") for r in results.values()), results
    assert "a migrated request, going on after" in survivor.log()
    text, _, _, finish = answer(client, NAME, QUESTIONS[0])
    assert finish == "length"
    assert httpx.get(cluster.url + "/health", timeout=10).status_code == 200
