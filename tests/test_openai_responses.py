"""serve/responses.py and serve/streams.py without a model: finish reasons a client may see, usage over n choices
and prompts, the legacy logprobs' offsets, and a stream that merges what its reader has not taken per sequence."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pipeline.outputs import RequestOutput, Usage
from serve.metrics import Metrics
from serve.protocol import APIError
from serve.responses import ChatChunks, TokenText, completion_logprobs, finish_reason, usage_json
from serve.streams import Admission, RequestStream
from serve.tools import ToolCall


def _out(request_id="r", index=0, text="", ids=(), finished=False, reason=None, usage=Usage(5, 0, 2), **kw):
    return RequestOutput(request_id, finished, reason, usage, index=index, delta_text=text,
                         delta_token_ids=list(ids), **kw)


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i) for i in ids)


def test_an_aborted_sequence_never_reaches_a_client_as_abort():
    assert finish_reason(_out(finished=True, reason="length")) == "length"
    error = pytest.raises(APIError, finish_reason, _out(finished=True, reason="abort")).value
    assert error.status == 503 and error.code == "request_aborted"


def test_usage_counts_each_prompt_once_and_sums_completions():
    finals = [_out("a", 0, usage=Usage(5, 3, 2)), _out("a", 1, usage=Usage(5, 4, 2)), _out("b", 0, usage=Usage(7, 1))]
    assert usage_json(finals) == {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
                                  "prompt_tokens_details": {"cached_tokens": 2}}


def test_legacy_logprobs_offsets_continue_across_chunks():
    text = TokenText(_Tokenizer())
    first, offset = completion_logprobs(text, [0, 1], [-0.5, -1e9], [[(0, -0.5), (2, -0.7)], [(3, -0.1)]])
    assert first == {"tokens": ["a", "b"], "token_logprobs": [-0.5, -9999.0], "text_offset": [0, 1],
                     "top_logprobs": [{"a": -0.5, "c": -0.7}, {"b": -9999.0, "d": -0.1}]}
    second, offset = completion_logprobs(text, [2], [-0.2], [[]], offset)
    assert second["text_offset"] == [2] and offset == 3
    assert completion_logprobs(text, [2], None, None, 4) == (None, 4)


def test_a_required_tool_call_streams_whole_at_the_end():
    chunks = ChatChunks({"id": "c", "created": 0, "model": "m"}, 1, TokenText(_Tokenizer()), ToolCall(None), True)
    assert chunks.start()[0]["usage"] is None
    assert chunks.delta(_out(text='{"name": "f", ')) == []
    *_, call, end = chunks.delta(_out(text='"arguments": {"x": 1}}', finished=True, reason="stop"))
    delta = call["choices"][0]["delta"]["tool_calls"][0]
    assert delta["function"] == {"name": "f", "arguments": '{"x": 1}'} and delta["id"].startswith("call_")
    assert end["choices"][0]["finish_reason"] == "tool_calls"


def test_a_stream_merges_per_sequence_and_ends_after_all_of_them():
    async def run():
        front = SimpleNamespace(metrics=Metrics(), num_reading=1, num_active=1, _reading=asyncio.Semaphore(0),
                                abort=lambda request_id: None)
        stream = RequestStream(front, "r", 0.0, Admission(front), num_sequences=2)
        for out in [_out(index=0, text="a", ids=[0]), _out(index=1, text="x", ids=[9]),
                    _out(index=0, text="b", ids=[1]), _out(index=1, text="y", ids=[8], finished=True, reason="stop")]:
            stream.put(out)
        assert stream.num_pending == 2  # one per sequence, whatever the reader missed
        seen = []
        reader = stream.__aiter__()
        seen.append(await reader.__anext__())
        seen.append(await reader.__anext__())
        stream.put(_out(index=0, text="c", ids=[2], finished=True, reason="length"))
        seen += [out async for out in reader]
        return stream, seen

    stream, seen = asyncio.run(run())
    assert [(o.index, o.delta_text, o.finished) for o in seen] == [(0, "ab", False), (1, "xy", True), (0, "c", True)]
    assert stream.finished
