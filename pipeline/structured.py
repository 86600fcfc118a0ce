"""Structured outputs with xgrammar (the grammar engine vLLM and SGLang use): a request's output held to a
JSON schema, any JSON object, a regular expression, one of fixed strings, or an EBNF grammar.

A spec is compiled once against the vocabulary (``GrammarCompiler``: per grammar state, which tokens can
come next) and cached; each request gets its own ``GrammarMatcher`` over it, a pushdown automaton fed the
sampled tokens. Per step, the matchers of the constrained rows fill one packed bitmask (a bit per token,
as vLLM's ``backend_xgrammar`` / ``apply_grammar_bitmask``), which sets the disallowed logits of those rows
to -inf before sampling; unconstrained rows are neither filled nor touched. Once the grammar is complete
only the engine's stop tokens are allowed, so the request ends on EOS.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch
import xgrammar as xgr

from pipeline.sampling import StructuredOutputs

DEFAULT_CACHE_BYTES = 512 * 2**20  # compiled grammars kept (xgrammar's own estimate of their size)

# string formats xgrammar's JSON-schema converter turns into grammar (others it would let through unchecked)
STRING_FORMATS = frozenset({
    "email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
    "uri-reference", "uri-template", "json-pointer", "relative-json-pointer",
})
# JSON-schema keywords whose value is one subschema, a list of them, or a map of name -> subschema
_ONE_SCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
               "contains", "propertyNames", "not", "if", "then", "else")
_LIST_SCHEMAS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_MAP_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# keywords xgrammar 0.2 accepts but does not enforce: refused rather than silently ignored
_UNENFORCED = {
    "not": "'not'", "if": "'if' / 'then' / 'else'", "then": "'if' / 'then' / 'else'",
    "else": "'if' / 'then' / 'else'", "dependentRequired": "'dependentRequired'",
    "dependentSchemas": "'dependentSchemas'", "dependencies": "'dependencies'",
}


# the vocabulary as xgrammar sees it

def _decoder_kinds(decoder: dict) -> set[str]:
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type")}


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids) -> xgr.TokenizerInfo:
    """xgrammar's view of ``tokenizer`` (a ``tokenization.TextTokenizer``) over the model's ``vocab_size``
    logits. The vocabulary type follows the tokenizer's decoder: byte-fallback BPE (SentencePiece-like,
    ``▁`` for a space, ``<0xNN>`` pieces for bytes) or byte-level BPE (GPT-2's byte-to-unicode alphabet).
    Special tokens and the ids past the tokenizer (a padded ``lm_head``) get no text, so a grammar never
    allows them: their text would vanish on decode (``skip_special_tokens``). Stop tokens are allowed by
    id, when the grammar is complete."""
    tok = tokenizer.tokenizer  # tokenizers.Tokenizer
    special = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
    encoded = [""] * vocab_size
    for token, token_id in tok.get_vocab(with_added_tokens=True).items():
        if token_id < vocab_size and token_id not in special:
            encoded[token_id] = token
    kinds = _decoder_kinds(json.loads(tok.decoder.__getstate__())) if tok.decoder is not None else set()
    if "ByteLevel" in kinds:
        vocab_type, space = xgr.VocabType.BYTE_LEVEL, "Ġ"
    elif kinds & {"ByteFallback", "Metaspace"}:
        vocab_type, space = xgr.VocabType.BYTE_FALLBACK, "▁"
    else:
        vocab_type, space = xgr.VocabType.RAW, " "
    first = tok.encode("a", add_special_tokens=False).tokens[:1]
    return xgr.TokenizerInfo(encoded, vocab_type, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids),
                             add_prefix_space=bool(first) and first[0].startswith(space))


# specs: checked, then a canonical key and how to compile it

def _xgrammar_message(error: Exception) -> str:
    """xgrammar's C++ message without its ``[time] /path/file.cc:line:`` prefix."""
    return re.sub(r"^\[[\d:]+\] \S+?:\d+: ", "", str(error)).strip()


def prepare_json_schema(schema, path: str = "#"):
    r"""``schema`` as xgrammar is given it; ValueError naming the first place it would not enforce.

    xgrammar 0.2.9 compiles a string's ``minLength`` / ``maxLength`` to ``[^"\\\r\n]{m,n}``, which lets raw
    control characters into the string (invalid JSON); the same bound as a ``pattern`` compiles to JSON's own
    string characters, so a length-bounded string is handed over as one."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise ValueError(f"structured_outputs.json: {path} must be a JSON schema (an object), got {schema!r}")
    for key, what in _UNENFORCED.items():
        if key in schema:
            raise ValueError(f"structured_outputs.json: {what} at {path} is not supported (xgrammar does not "
                             "enforce it)")
    if schema.get("uniqueItems") is True:
        raise ValueError(f"structured_outputs.json: 'uniqueItems' at {path} is not supported (xgrammar does not "
                         "enforce it)")
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        raise ValueError(f"structured_outputs.json: 'allOf' with more than one schema at {path} is not supported "
                         "(xgrammar does not enforce it); merge them into one")
    if "format" in schema and schema["format"] not in STRING_FORMATS:
        raise ValueError(f"structured_outputs.json: format {schema['format']!r} at {path} is not supported; "
                         f"supported: {', '.join(sorted(STRING_FORMATS))}")
    lengths = "minLength" in schema or "maxLength" in schema
    if lengths and ("pattern" in schema or "format" in schema):
        raise ValueError(f"structured_outputs.json: 'minLength' / 'maxLength' together with 'pattern' or 'format' "
                         f"at {path} is not supported (xgrammar drops the length); put the length in the pattern")
    required, properties = schema.get("required", []), schema.get("properties", {})
    if isinstance(required, list) and isinstance(properties, dict):
        missing = [name for name in required if name not in properties]
        if missing:
            raise ValueError(f"structured_outputs.json: {path} requires {missing} but defines no such properties")
    out = dict(schema)
    types = schema.get("type")
    if lengths and (types == "string" or isinstance(types, list) and "string" in types):
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (low, high or 0)):
            raise ValueError(f"structured_outputs.json: minLength / maxLength at {path} must be integers >= 0")
        out["pattern"] = f"^.{{{low},{'' if high is None else high}}}$"
    for key in _ONE_SCHEMA:
        if isinstance(schema.get(key), (dict, bool)):
            out[key] = prepare_json_schema(schema[key], f"{path}/{key}")
    for key in _LIST_SCHEMAS:
        if isinstance(schema.get(key), list):
            out[key] = [prepare_json_schema(sub, f"{path}/{key}/{i}") for i, sub in enumerate(schema[key])]
    for key in _MAP_SCHEMAS:
        if isinstance(schema.get(key), dict):
            out[key] = {name: prepare_json_schema(sub, f"{path}/{key}/{name}") for name, sub in schema[key].items()}
    return out


def _ebnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # xgrammar's EBNF strings take JSON's escapes


def grammar_key(spec: StructuredOutputs) -> tuple[str, str]:
    """(kind, canonical source): equal keys compile to the same grammar. A schema is the compact JSON of its
    parsed form, key order kept (xgrammar emits properties in the order the schema declares them)."""
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {schema!r}")
        return "json", json.dumps(prepare_json_schema(schema), ensure_ascii=False, separators=(",", ":"))
    if spec.json_object:
        return "json", '{"type":"object"}'  # an object (xgrammar's builtin JSON grammar also admits arrays)
    if spec.regex is not None:
        return "regex", spec.regex
    if spec.choice is not None:
        return "grammar", "root ::= " + " | ".join(_ebnf_literal(c) for c in spec.choice)
    return "grammar", spec.grammar


# the cache and the per-request constraint

class Constraint:
    """One request's place in its grammar (n > 1 sequences each have their own)."""

    def __init__(self, matcher: xgr.GrammarMatcher, masks: TokenMasks):
        self.matcher = matcher
        self.masks = masks

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self.matcher.is_terminated():  # ignore_eos: stop tokens only, until the request ends
            bitmask[row] = self.masks.stop_only
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if self.matcher.is_terminated() and token_id in self.masks.stop_token_ids:
            return
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} is outside the grammar: the sampler drew a token its mask "
                               "disallowed")


class TokenMasks:
    """The packed bitmask buffers, reused across steps: [rows, ceil(vocab / 32)] int32 on the host (xgrammar
    fills host memory; pinned when the logits are on a GPU) and its copy on the logits' device."""

    def __init__(self, vocab_size: int, stop_token_ids):
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_token_index = torch.tensor(sorted(self.stop_token_ids))
        words = [0] * xgr.get_bitmask_shape(1, vocab_size)[1]
        for token_id in self.stop_token_ids:
            words[token_id // 32] |= 1 << token_id % 32
        self.stop_only = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None

    def buffers(self, num_rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host is None or self._host.shape[0] < num_rows or self._device.device != device:
            shape = xgr.get_bitmask_shape(max(num_rows, 8), self.vocab_size)
            pinned = device.type == "cuda"
            self._host = torch.empty(shape, dtype=torch.int32, pin_memory=pinned)
            self._device = self._host if device.type == "cpu" else torch.empty(shape, dtype=torch.int32,
                                                                                device=device)
        return self._host[:num_rows], self._device[:num_rows]


class GrammarCache:
    """Compiles specs against one tokenizer and vocabulary; keeps the compiled grammars in an LRU bounded
    by their size. Thread-safe: a grammar compiles outside the lock (a server thread validating a request
    never holds up the engine thread), and two threads compiling the same spec keep the first result."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, max_bytes: int = DEFAULT_CACHE_BYTES):
        if not stop_token_ids:
            raise ValueError("structured outputs need a stop token to end a completed grammar")
        self.info = tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)  # ours is keyed canonically
        self.masks = TokenMasks(vocab_size, stop_token_ids)
        self.max_bytes = max_bytes
        self.num_compiled = 0
        self._grammars: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._num_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._grammars)

    def constraint(self, spec: StructuredOutputs) -> Constraint:
        """A fresh matcher for ``spec``; ValueError for a schema, regex or grammar that cannot be compiled."""
        return Constraint(xgr.GrammarMatcher(self.compiled(spec)), self.masks)

    def compiled(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        key = grammar_key(spec)
        with self._lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        grammar = self._compile(*key)
        with self._lock:
            if key in self._grammars:
                return self._grammars[key]
            self.num_compiled += 1
            self._grammars[key] = grammar
            self._num_bytes += grammar.memory_size_bytes
            while self._num_bytes > self.max_bytes and len(self._grammars) > 1:
                _, evicted = self._grammars.popitem(last=False)
                self._num_bytes -= evicted.memory_size_bytes
        return grammar

    def _compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        try:
            if kind == "json":  # one line, ", " / ": " separators: no runs of whitespace to wander into
                return self.compiler.compile_json_schema(source, any_whitespace=False)
            if kind == "regex":
                return self.compiler.compile_regex(source)
            return self.compiler.compile_grammar(source)
        except RuntimeError as e:
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}[kind]
            raise ValueError(f"structured_outputs: cannot compile the {what}: {_xgrammar_message(e)}") from None


def apply_constraints(logits: torch.Tensor, constraints: list[Constraint | None]) -> None:
    """In place on [rows, vocab] float32 ``logits``: each constrained row's disallowed tokens become -inf
    (ids past the tokenizer's vocabulary included); rows whose constraint is None are left untouched."""
    rows = [row for row, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    masks = constraints[rows[0]].masks
    assert logits.shape[-1] == masks.vocab_size, f"logits width {logits.shape[-1]} != vocab {masks.vocab_size}"
    host, device = masks.buffers(logits.shape[0], logits.device)
    for row in rows:  # row-aligned, as xgrammar's kernels index the bitmask with the logits' row
        constraints[row].fill(host, row)
    if logits.device.type != "cpu":
        lo, hi = rows[0], rows[-1] + 1
        device[lo:hi].copy_(host[lo:hi], non_blocking=True)  # the step's .tolist() syncs before the next fill
    xgr.apply_token_bitmask_inplace(logits, device, vocab_size=masks.vocab_size, indices=rows)
    complete = [row for row in rows if constraints[row].matcher.is_completed()]
    if complete:  # a complete grammar whose stop tokens min_tokens banned: the grammar wins, the request ends
        index = torch.tensor(complete, device=logits.device)
        dead = index[logits.index_select(0, index).isneginf().all(dim=-1)]
        if len(dead):
            logits[dead[:, None], masks.stop_token_index.to(logits.device)] = 0.0
