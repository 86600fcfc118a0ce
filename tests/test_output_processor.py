"""pipeline/output_processor.py: stop tokens, stop strings, min_tokens, include_stop_str_in_output and
skip_special_tokens against a plain reference of vLLM's rules (one-shot decodes, brute-force string search)."""
from __future__ import annotations

import pytest

from pipeline.output_processor import OutputProcessor
from pipeline.request import Request, RequestStatus
from pipeline.sampling import SamplingParams
from tokenization import TextTokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return TextTokenizer.from_pretrained(tiny_checkpoint)


def run(tok, ids: list[int], params: SamplingParams, eos: frozenset[int]):
    """Feeds ``ids`` one per step as the engine does: (final output, concatenated deltas)."""
    processor = OutputProcessor(tok, eos, max_model_len=4096)
    req = Request("r", [tok.bos_token_id], params)
    processor.add(req)
    deltas = []
    for token in ids:
        req.append_token(token)
        status, out = processor.update(req)
        if status is not None:
            req.status = status
            final = processor.finish(req)
            return final, "".join(deltas) + final.delta_text
        deltas.append(out.delta_text)
    raise AssertionError("max_tokens should have ended it")


def ref_output(tok, ids: list[int], params: SamplingParams, eos: frozenset[int]) -> tuple[str, list[int], str]:
    """vLLM's rules, plainly: (text, token ids, finish reason)."""
    skip = params.skip_special_tokens
    before_min = len(tok.decode(ids[:params.min_tokens], skip_special_tokens=skip)) if params.min_tokens else 0
    shown = []
    for n, token in enumerate(ids, 1):
        if n >= params.min_tokens and (token in params.stop_token_ids or (token in eos and not params.ignore_eos)):
            shown += [token] if params.include_stop_str_in_output else []
            return tok.decode(shown, skip_special_tokens=skip), ids[:n], "stop"
        shown.append(token)
        text = tok.decode(shown, skip_special_tokens=skip)
        if n > params.min_tokens:
            hits = [(i, s) for s in params.stop for i in range(len(text))
                    if text.startswith(s, i) and i + len(s) > before_min]  # ends past the text before min_tokens
            if hits:
                i, s = min(hits)
                return text[:i + len(s) if params.include_stop_str_in_output else i], ids[:n], "stop"
        if n == params.max_tokens:
            return text, ids[:n], "length"
    raise AssertionError("max_tokens should have ended it")


def check(tok, ids, eos=frozenset(), **kwargs):
    params = SamplingParams(max_tokens=len(ids), **kwargs)
    final, streamed = run(tok, ids, params, eos)
    text, token_ids, reason = ref_output(tok, ids, params, eos)
    assert (final.text, final.token_ids, final.finish_reason) == (text, token_ids, reason)
    assert streamed == final.text  # the deltas add up to the answer
    return final


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("min_tokens", [0, 3, 9, 14])
def test_stop_strings_with_min_tokens_and_include(tok, include, min_tokens):
    ids = tok.encode("ab STOP cd STOP ef XY gh")
    final = check(tok, ids, stop=["STOP", "XY"], min_tokens=min_tokens, include_stop_str_in_output=include)
    assert final.finish_reason == "stop" and len(final.token_ids) >= min_tokens


def test_stop_string_cut_and_kept(tok):
    ids = tok.encode("one two STOP three")
    assert check(tok, ids, stop=["STOP"]).text == "one two "
    assert check(tok, ids, stop=["STOP"], include_stop_str_in_output=True).text == "one two STOP"
    assert check(tok, ids, stop=["two", "one t"]).text == ""  # the earliest match wins
    late = check(tok, ids, stop=["STOP"], min_tokens=len(tok.encode("one two ST")))  # STOP straddles min_tokens
    assert late.text == "one two "


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_stop_tokens_stay_in_token_ids_and_leave_the_text(tok, include, skip):
    eos = frozenset({tok.eos_token_id})
    x = tok.encode("x")[-1]
    ids = tok.encode("hi there") + [x] + tok.encode(" more") + [tok.eos_token_id] + tok.encode("tail")
    by_id = check(tok, ids, eos, stop_token_ids=[x], include_stop_str_in_output=include, skip_special_tokens=skip)
    assert by_id.token_ids[-1] == x and by_id.text == "hi there" + ("x" if include else "")
    ids = tok.encode("hi") + [tok.eos_token_id] + tok.encode("tail")
    by_eos = check(tok, ids, eos, include_stop_str_in_output=include, skip_special_tokens=skip)
    assert by_eos.token_ids[-1] == tok.eos_token_id
    assert by_eos.text == "hi" + ("</s>" if include and not skip else "")


@pytest.mark.parametrize("skip", [True, False])
def test_ignore_eos_and_special_tokens_in_the_text(tok, skip):
    eos = frozenset({tok.eos_token_id})
    ids = tok.encode("a") + [tok.eos_token_id, tok.bos_token_id] + tok.encode("b")
    final = check(tok, ids, eos, ignore_eos=True, skip_special_tokens=skip)
    assert final.finish_reason == "length" and final.text == tok.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in final.text) is not skip


def test_min_tokens_holds_the_stop_token_checks(tok):
    eos = frozenset({tok.eos_token_id})
    a, bc = tok.encode("a"), tok.encode("bc")
    ids = a + [tok.eos_token_id] + bc + [tok.eos_token_id] + tok.encode("d")
    final = check(tok, ids, eos, min_tokens=len(a) + 2)  # the first EOS comes before min_tokens
    assert final.token_ids == ids[:len(a) + len(bc) + 2] and final.finish_reason == "stop"
    assert final.text == tok.decode(a + bc) == "a bc"


class _Terminated:
    is_terminated = True


def test_a_stop_token_after_a_finished_grammar_ends_the_request_before_min_tokens(tok):
    """min_tokens holds stop tokens back, but once the row's grammar is terminated (it accepted a stop token) the
    stop token ends the request: no EOS padding up to min_tokens."""
    from pipeline.sampling import SamplerState

    eos = frozenset({tok.eos_token_id})
    processor = OutputProcessor(tok, eos, max_model_len=4096)
    req = Request("r", [tok.bos_token_id], SamplingParams(max_tokens=8, min_tokens=6))
    req.sampler_state = SamplerState(constraint=None)
    processor.add(req)
    for token in tok.encode("yes"):
        req.append_token(token)
        assert processor.update(req)[0] is None
    req.sampler_state.constraint = _Terminated()
    req.append_token(tok.eos_token_id)
    status, _ = processor.update(req)
    assert status == RequestStatus.FINISHED_STOPPED
    req.status = status
    final = processor.finish(req)
    assert final.text == "yes" and final.token_ids == tok.encode("yes") + [tok.eos_token_id]
