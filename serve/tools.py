"""Tool calling for the chat API: ``tools`` + ``tool_choice`` -> the tools the chat template renders and the
structured output that makes the answer a call; the answer -> OpenAI ``tool_calls``.

A named function (``{"type": "function", "function": {"name": ...}}``) generates its arguments under the
function's JSON schema. ``"required"`` generates ``{"name": <one of the tools>, "arguments": {...}}`` under a
schema whose alternatives are each tool's (vLLM builds the same shape for ``"required"``, as a list).
``"none"`` renders the tools and generates text. ``"auto"`` needs the model family's own tool-call format
(special tokens the answer is parsed for); neither served family defines one, so it is refused.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from pipeline.sampling import StructuredOutputs
from serve.protocol import bad_request, short

AUTO_REFUSED = ("tool_choice 'auto' needs a model family with a tool-call format, and the served family has "
                "none; send tool_choice 'required', a named function ({\"type\": \"function\", \"function\": "
                "{\"name\": ...}}) or 'none'")


@dataclass(frozen=True)
class ToolCall:
    """How the answer becomes a call: ``name`` set: the answer is that function's arguments; None (``required``):
    the answer is ``{"name", "arguments"}``."""

    name: str | None = None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _tools(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad_request("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}",
                          param="tools")
    for tool in value:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) or \
                not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request(f"each tool must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                              f"{short(tool)}", param="tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad_request(f"tool {short(function['name'])}'s parameters must be a JSON schema object",
                              param="tools")
    names = [t["function"]["name"] for t in value]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", param="tools")
    return value


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict]) -> dict:
    """One call to any of ``tools``: each alternative fixes the name and takes that tool's parameters."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                                       "arguments": _parameters(t)},
                       "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}


def tool_request(body: dict) -> tuple[list[dict] | None, ToolCall | None, StructuredOutputs | None]:
    """(tools for the template, how the answer becomes a call, the structured output that forces it)."""
    tools = None if body.get("tools") is None else _tools(body["tools"])
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return tools, None, None
    if tools is None:
        raise bad_request("tool_choice needs tools", param="tool_choice")
    if choice == "auto":
        raise bad_request(AUTO_REFUSED, "unsupported_tool_choice", param="tool_choice")
    if choice == "required":
        return tools, ToolCall(None), StructuredOutputs(json=required_schema(tools))
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}}, got {short(choice)}", param="tool_choice")
    tool = next((t for t in tools if t["function"]["name"] == name), None)
    if tool is None:
        raise bad_request(f"tool_choice names {short(name)}, which is not among the tools", param="tool_choice")
    return tools, ToolCall(name), StructuredOutputs(json=_parameters(tool))


def tool_calls(call: ToolCall, text: str, call_id: str) -> list[dict] | None:
    """The answer as OpenAI ``tool_calls`` (``arguments`` as JSON text); None when it is not a whole call (cut
    by ``max_tokens``)."""
    if call.name is not None:
        name, arguments = call.name, text
    else:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
            return None
        name, arguments = value["name"], json.dumps(value["arguments"], ensure_ascii=False)
    return [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]
