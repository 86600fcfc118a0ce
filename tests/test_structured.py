"""Structured outputs (pipeline/structured.py): the token mask against a plain-Python reference, then the random
models (which emit garbage on their own) held to JSON schemas checked by ``jsonschema``, regexes, choices and
grammars through the Pipeline."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from gemma4_fixtures import gemma4_folder  # noqa: F401 (fixture)
from pipeline import Pipeline, SamplingParams
from pipeline.sampling import StructuredOutputs
from pipeline.structured import GrammarCache, apply_constraints
from tokenization import TextTokenizer

MODEL_VOCAB = 512  # the tiny Fuyu's logits; its tokenizer has 370 ids


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _obj(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties)}


SCHEMAS = [
    _obj(name={"type": "string", "maxLength": 3}, age=_int(0, 120)),
    _obj(user=_obj(id=_int(1, 9), ok={"type": "boolean"})),
    {"type": "array", "items": _int(-5, 5), "minItems": 1, "maxItems": 3},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"enum": [1, "two", None, True]},
    {"type": "boolean"},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "object", "properties": {"a": _int(0, 9), "b": {"type": "boolean"}}, "required": ["a"]},
    {"anyOf": [_int(0, 9), {"type": "string", "maxLength": 2}]},
    {"type": "array", "items": _obj(k={"enum": ["x", "y"]}, v=_int(0, 99)), "minItems": 1, "maxItems": 2},
    _obj(version={"const": 2}, kind={"const": "point"}),
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
    {"type": ["integer", "null"], "minimum": -9, "maximum": 9},
    {"$defs": {"pt": _obj(x=_int(0, 9), y=_int(0, 9))}, **_obj(a={"$ref": "#/$defs/pt"}, b={"$ref": "#/$defs/pt"})},
    {"type": "array", "prefixItems": [{"type": "boolean"}, _int(0, 3)], "items": False},
    {**_obj(matrix={"type": "array", "minItems": 2, "maxItems": 2,
                    "items": {"type": "array", "items": _int(0, 1), "minItems": 2, "maxItems": 2}}),
     "additionalProperties": False},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    {"type": "string", "minLength": 2, "maxLength": 3},
    _obj(a=_obj(b=_obj(c={"type": "array", "items": {"enum": ["p", "q"]}, "maxItems": 2}))),
    _obj(id=_int(100, 999), tags={"type": "array", "items": {"type": "string", "maxLength": 2}, "maxItems": 2},
         score={"type": "number", "minimum": -1, "maximum": 1}, active={"type": "boolean"}),
]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline.from_pretrained(str(tiny_checkpoint), num_blocks=512, block_size=8)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return TextTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def cache(tokenizer):
    return GrammarCache(tokenizer, MODEL_VOCAB, {tokenizer.eos_token_id})


def _token_bytes(tokenizer: TextTokenizer, token_id: int) -> bytes | None:
    """What a token stands for, read off its piece (``<0xNN>`` a byte, ``▁`` a space); None for special ids
    and ids past the tokenizer."""
    piece = tokenizer.tokenizer.id_to_token(token_id)
    special = tokenizer.tokenizer.get_added_tokens_decoder()
    if piece is None or (token_id in special and special[token_id].special):
        return None
    if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


def _allowed(logits_row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(logits_row > float("-inf")).flatten().tolist())


def _gemma4_tokenizer() -> TextTokenizer:
    from samples.random_gemma4_unified import build_tokenizer

    return TextTokenizer(build_tokenizer(), bos_token="<bos>", eos_token="<eos>")


@pytest.mark.parametrize("family", ["fuyu", "gemma4"])
def test_the_first_mask_of_a_choice_is_every_token_that_starts_one_of_them(tokenizer, family):
    """Reference: a token may come first iff its bytes are a non-empty prefix of a choice (multi-character
    pieces, byte-fallback pieces for a non-ASCII character, and ``▁`` for a space)."""
    tokenizer = tokenizer if family == "fuyu" else _gemma4_tokenizer()
    cache = GrammarCache(tokenizer, MODEL_VOCAB, {tokenizer.eos_token_id})
    for choices in (["yes", "no"], ["|SPEAKER| x", "|NE"], ["é b", "a b"], [" yes", "\tno"]):
        logits = torch.randn(1, MODEL_VOCAB)
        apply_constraints(logits, [cache.constraint(StructuredOutputs(choice=choices))])
        want = {i for i in range(MODEL_VOCAB) if (b := _token_bytes(tokenizer, i))
                and any(c.encode().startswith(b) for c in choices)}
        assert _allowed(logits[0]) == want, choices
        assert want and all(i < tokenizer.vocab_size for i in want)



def test_ids_past_the_tokenizer_and_special_ids_are_never_allowed(cache, tokenizer):
    logits = torch.randn(1, MODEL_VOCAB)
    apply_constraints(logits, [cache.constraint(StructuredOutputs(regex=r"[^\n]*"))])
    allowed = _allowed(logits[0])
    specials = set(tokenizer.tokenizer.get_added_tokens_decoder())
    assert allowed and max(allowed) < tokenizer.vocab_size
    assert allowed & specials == {tokenizer.eos_token_id}  # the empty string is complete: EOS may end it


def test_unconstrained_rows_are_left_bit_for_bit(cache, tokenizer):
    logits = torch.randn(5, MODEL_VOCAB)
    before = logits.clone()
    spec = StructuredOutputs(json_object=True)
    apply_constraints(logits, [None, cache.constraint(spec), None, None, cache.constraint(spec)])
    for row in (0, 2, 3):
        assert torch.equal(logits[row], before[row])
    for row in (1, 4):  # an object opens with "{" (its piece or its byte)
        assert _allowed(logits[row]) == {i for i in range(MODEL_VOCAB) if _token_bytes(tokenizer, i) == b"{"}
        kept = logits[row] > float("-inf")
        assert torch.equal(logits[row][kept], before[row][kept])


def test_a_complete_grammar_allows_only_stop_tokens_then_terminates(cache, tokenizer):
    eos = tokenizer.eos_token_id
    constraint = cache.constraint(StructuredOutputs(choice=["ab"]))
    for token in tokenizer.encode("ab")[-2:]:  # "a", "b" (the first id is Metaspace's "▁")
        assert not constraint.is_terminated
        constraint.accept(token)
    logits = torch.randn(1, MODEL_VOCAB)
    apply_constraints(logits, [constraint])
    assert _allowed(logits[0]) == {eos}
    constraint.accept(eos)
    assert constraint.is_terminated
    logits = torch.randn(1, MODEL_VOCAB)
    apply_constraints(logits, [constraint])  # ignore_eos keeps a request going: still stop tokens only
    assert _allowed(logits[0]) == {eos}
    constraint.accept(eos)
    with pytest.raises(RuntimeError, match="outside the grammar"):
        constraint.accept(tokenizer.encode("a")[-1])


def test_a_token_the_grammar_rejects_is_an_error(cache, tokenizer):
    constraint = cache.constraint(StructuredOutputs(choice=["yes"]))
    with pytest.raises(RuntimeError, match="outside the grammar"):
        constraint.accept(tokenizer.encode("n")[-1])


def test_compiled_grammars_are_cached_by_canonical_spec(cache):
    schema = _obj(a=_int(0, 9), b={"type": "boolean"})
    first = cache.constraint(StructuredOutputs(json=schema))
    second = cache.constraint(StructuredOutputs(json=json.dumps(schema, indent=2)))  # same schema as JSON text
    assert cache.num_compiled == 1 and first.matcher is not second.matcher  # a fresh matcher per sequence
    first.accept(cache.info.decoded_vocab.index(b"{"))
    assert not second.matcher.accept_token(cache.info.decoded_vocab.index(b"}"))  # second never saw "{"
    reordered = {**schema, "properties": {"b": schema["properties"]["b"], "a": schema["properties"]["a"]}}
    cache.constraint(StructuredOutputs(json=reordered))  # xgrammar emits properties in the declared order
    cache.constraint(StructuredOutputs(regex="a+"))
    cache.constraint(StructuredOutputs(choice=["a+"]))  # the same text as a choice is another grammar
    assert cache.num_compiled == 4


def test_the_cache_evicts_the_least_recently_used_grammar(tokenizer):
    specs = [StructuredOutputs(regex=f"{c}+") for c in "abc"]
    cache = GrammarCache(tokenizer, MODEL_VOCAB, {tokenizer.eos_token_id}, max_bytes=1)
    one_bytes = cache.compiled(specs[0]).memory_size_bytes
    cache = GrammarCache(tokenizer, MODEL_VOCAB, {tokenizer.eos_token_id}, max_bytes=2 * one_bytes + one_bytes // 2)
    cache.compiled(specs[0]), cache.compiled(specs[1])
    cache.compiled(specs[0])  # a is now the most recent: b goes first
    cache.compiled(specs[2])
    assert len(cache) == 2 and cache.num_compiled == 3
    cache.compiled(specs[0])
    assert cache.num_compiled == 3
    cache.compiled(specs[1])
    assert cache.num_compiled == 4


def _in_threads(work, num_threads: int) -> list[Exception]:
    """Runs ``work`` in ``num_threads`` threads at once; the exceptions they raised."""
    errors = []

    def guarded():
        try:
            work()
        except Exception as e:  # noqa: BLE001 (returned)
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_share_one_cache(cache):
    specs = [StructuredOutputs(json=_obj(x=_int(0, i))) for i in range(1, 5)]

    def work():
        for spec in specs * 3:
            cache.constraint(spec)

    errors = _in_threads(work, 4)
    assert not errors and len(cache) == 4
    assert len({id(cache.compiled(spec)) for spec in specs}) == 4


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputs(json="{not json"), "not valid JSON"),
    (StructuredOutputs(json="[1, 2]"), "must be a JSON schema object"),
    (StructuredOutputs(json={"type": "nonsense"}), 'Unsupported type "nonsense"'),
    (StructuredOutputs(json=_int(5, 1)), "minimum greater than maximum"),
    (StructuredOutputs(json={"$ref": "#/$defs/missing"}), "cannot compile the JSON schema"),
    (StructuredOutputs(json={"type": "array", "uniqueItems": True}), "'uniqueItems' at #"),
    (StructuredOutputs(json=_obj(a={"not": {"type": "integer"}})), "'not' at #/properties/a"),
    (StructuredOutputs(json={"allOf": [_int(0, 9), {"minimum": 5}]}), "'allOf' with more than one"),
    (StructuredOutputs(json=_obj(d={"type": "string", "format": "phone"})), "format 'phone'"),
    (StructuredOutputs(json={"type": "string", "pattern": "a+", "maxLength": 3}), "'pattern' or 'format'"),
    (StructuredOutputs(json={"type": "object", "required": ["a"]}), r"requires \['a'\]"),
    (StructuredOutputs(json={"type": "string", "maxLength": "3"}), "must be integers >= 0"),
    (StructuredOutputs(json={"type": "string", "minLength": 4, "maxLength": 2}), "cannot compile the JSON schema"),
    (StructuredOutputs(regex="a(b"), "cannot compile the regex: .*parenthesis"),
    (StructuredOutputs(grammar="root ::= missing"), 'cannot compile the grammar: .*"missing" is not defined'),
    (StructuredOutputs(grammar='start: "a"'), "cannot compile the grammar"),  # Lark is not EBNF
])
def test_bad_specs_are_value_errors_before_anything_runs(pipe, spec, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(["hi"], SamplingParams(structured=spec, max_tokens=4))
    assert not pipe.engine.has_unfinished()


def test_a_property_named_like_a_keyword_is_a_property(cache):
    cache.constraint(StructuredOutputs(json=_obj(**{"not": _int(0, 1), "if": {"type": "boolean"}})))


@pytest.mark.slow
def test_twenty_json_schemas_parse_and_validate(pipe):
    """The random model on its own emits garbage; held to each schema, every output is valid JSON that the
    schema accepts. Schemas bound the output's length, so each ends on EOS well before max_tokens."""
    params = [SamplingParams(structured=StructuredOutputs(json=schema), max_tokens=160, temperature=1.0, seed=i)
              for i, schema in enumerate(SCHEMAS)]
    outs = pipe.generate([f"Answer in JSON {i}" for i in range(len(SCHEMAS))], params)
    checker = jsonschema.FormatChecker()
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema, format_checker=checker)
    assert len({out.text for out in outs}) == len(SCHEMAS)


def test_json_object_regex_choice_and_grammar(pipe):
    """Any JSON object has no bound on its keys: a row cut at max_tokens is honest about it ("length") and is
    the start of an object; the rows that end are objects."""
    specs = [StructuredOutputs(json_object=True)] * 4 + [
        StructuredOutputs(regex=r"[a-z]{3}-\d{2}( ok)?"), StructuredOutputs(choice=["yes", "no", "not sure"]),
        StructuredOutputs(grammar='root ::= "(" num ("," num)* ")"\nnum ::= [0-9] | [1-9] [0-9]')]
    params = [SamplingParams(structured=spec, max_tokens=32, temperature=1.0, seed=i) for i, spec in enumerate(specs)]
    *objects, regex, choice, grammar = pipe.generate(["go"] * len(specs), params)
    ended = [out for out in objects if out.finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(out.text), dict) for out in ended)
    assert all(out.text.startswith('{"') and len(out.token_ids) == 32 for out in objects if out not in ended)
    assert regex.finish_reason == choice.finish_reason == "stop"
    assert re.fullmatch(r"[a-z]{3}-\d{2}( ok)?", regex.text)
    assert choice.text in ("yes", "no", "not sure")
    number = r"([0-9]|[1-9][0-9])"
    if grammar.finish_reason == "stop":
        assert re.fullmatch(rf"\({number}(,{number})*\)", grammar.text)
    else:  # a list cut at max_tokens: a prefix of the language
        assert re.fullmatch(rf"\(({number},)*[0-9]{{0,2}}", grammar.text)


def test_an_unconstrained_row_is_unchanged_by_constrained_neighbours(pipe):
    plain = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    alone = pipe.generate(["the same prompt"], plain)[0]
    constrained = [SamplingParams(structured=StructuredOutputs(json=schema), max_tokens=16, temperature=1.0, seed=i)
                   for i, schema in enumerate(SCHEMAS[:3])]
    mixed = pipe.generate(["a", "the same prompt", "b", "c"], [constrained[0], plain, constrained[1], constrained[2]])
    assert mixed[1].token_ids == alone.token_ids


@pytest.mark.slow
def test_gemma4_unified_json_schemas(gemma4_folder):
    pipe = Pipeline.from_pretrained(str(gemma4_folder), num_blocks=256, block_size=8)
    schemas = [SCHEMAS[0], SCHEMAS[1], SCHEMAS[2], SCHEMAS[14], SCHEMAS[17]]
    params = [SamplingParams(structured=StructuredOutputs(json=schema), max_tokens=160, temperature=1.0, seed=i)
              for i, schema in enumerate(schemas)]
    outs = pipe.generate([f"Answer {i}" for i in range(len(schemas))], params)
    for schema, out in zip(schemas, outs):
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    choice = pipe.generate(["pick"], SamplingParams(structured=StructuredOutputs(choice=["left one", "right"]),
                                                    max_tokens=16, seed=0))[0]
    assert choice.text in ("left one", "right")


@pytest.mark.parametrize("schema", [{"type": "string"}, {"type": "string", "maxLength": 3},
                                    {"type": ["string", "null"], "minLength": 1}, _obj(k={"type": "string"})])
def test_json_strings_never_admit_raw_control_characters(cache, tokenizer, schema):
    """JSON forbids U+0000-U+001F unescaped in a string; xgrammar's own length rule would let them in."""
    constraint = cache.constraint(StructuredOutputs(json=schema))
    for token in tokenizer.encode('{"k": "' if "properties" in schema else '"')[1:]:
        constraint.accept(token)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_constraints(logits, [constraint])
    allowed = _allowed(logits[0])
    assert tokenizer.encode("a")[-1] in allowed
    assert not [i for i in allowed if (b := _token_bytes(tokenizer, i)) and b[0] < 0x20]


def test_a_complete_grammar_beats_min_tokens_and_ignore_eos_keeps_to_stop_tokens(pipe):
    """min_tokens bans EOS, a complete grammar allows nothing else: the grammar wins and the request ends;
    with ignore_eos a complete grammar only repeats EOS (dropped from the text) up to max_tokens."""
    spec = StructuredOutputs(choice=["yes"])
    early, ignoring = pipe.generate(["hi", "hi"], [SamplingParams(structured=spec, min_tokens=6, max_tokens=8),
                                                   SamplingParams(structured=spec, ignore_eos=True, max_tokens=8)])
    eos = pipe.tokenizer.eos_token_id
    assert (early.text, early.finish_reason) == ("yes", "stop")
    assert early.token_ids.count(eos) == 1 and early.token_ids[-1] == eos  # no EOS padding up to min_tokens
    assert (ignoring.text, ignoring.finish_reason, len(ignoring.token_ids)) == ("yes", "length", 8)
    assert set(ignoring.token_ids[-4:]) == {eos}


def test_each_of_n_sequences_has_its_own_grammar_state(pipe):
    outs = pipe.generate(["pick"], SamplingParams(structured=StructuredOutputs(choice=["yes", "no", "maybe not"]),
                                                  n=4, max_tokens=12, seed=3))[0]
    assert len(outs) == 4 and all(o.text in ("yes", "no", "maybe not") and o.finish_reason == "stop" for o in outs)


def test_a_grammar_whose_only_next_tokens_min_tokens_bans_gives_the_mask_back(pipe):
    """The grammar allows only stop_token_ids first, and min_tokens bans them: the grammar wins (the request
    goes on, no failed step for the batch)."""
    allowed = [100, 260]  # the tiny tokenizer's two ways to write "a"
    spec = StructuredOutputs(regex="a")
    outs = pipe.generate(["hi", "hi"], [
        SamplingParams(max_tokens=5, min_tokens=1, temperature=temperature, stop_token_ids=allowed, structured=spec)
        for temperature in (0.0, 1.0)])
    for out in outs:
        assert out.token_ids[0] in allowed and out.finish_reason == "stop" and len(out.token_ids) == 1


def test_threads_share_one_grammar_cache_per_sampler(monkeypatch, tokenizer):
    """Server threads validating structured requests at once build the sampler's GrammarCache once."""
    import pipeline.structured as structured
    from pipeline.sampling import Sampler

    built = []

    class SlowCache(structured.GrammarCache):
        def __init__(self, *args, **kwargs):
            built.append(self)
            threading.Event().wait(0.05)  # widen the window a racing thread would slip through
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(structured, "GrammarCache", SlowCache)
    sampler = Sampler()
    sampler.bind(tokenizer, frozenset({tokenizer.eos_token_id}), MODEL_VOCAB)
    barrier = threading.Barrier(6)

    def work():
        barrier.wait()
        sampler.new_state(SamplingParams(structured=StructuredOutputs(choice=["yes", "no"])))

    errors = _in_threads(work, 6)
    assert not errors and len(built) == 1
