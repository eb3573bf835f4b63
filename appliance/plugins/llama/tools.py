"""Tool calls for a local chat model (no livekit here): how a prompt offers tools, the
grammar that forces a call, and the parsing of the calls a reply makes.

A template without tool support gets the tools in its system prompt and earlier calls as
text (`fold_tools`); with "auto" the model may answer
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes style) or, as Llama
3.x does, bare JSON (`call_or_text`, `parse_calls`); a named or required `tool_choice` is
forced with a JSON-schema grammar (`forced_grammar`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, NamedTuple

from llama_cpp import LlamaGrammar

logger = logging.getLogger("appliance.llm")

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.S)
_TOOL_PROMPT = (
    "You can call these tools. To call one, reply with only "
    '<tool_call>{{"name": "<tool name>", "arguments": {{...}}}}</tool_call>.\n'
    "Tools:\n{tools}"
)


def arguments_as_objects(msg: dict[str, Any]) -> dict[str, Any]:
    """Tool-call arguments as JSON objects: chat templates (Qwen, Llama) render them as such."""
    if not msg.get("tool_calls"):
        return msg
    calls = []
    for call in msg["tool_calls"]:
        args = call["function"].get("arguments")
        if isinstance(args, str):
            args = _loads(args) if args.strip() else {}
        calls.append({**call, "function": {**call["function"], "arguments": args}})
    return {**msg, "tool_calls": calls}


def fold_tools(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """For templates without tool support: tools into the system prompt, calls into text."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        role, content = msg["role"], msg.get("content") or ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if role in ("system", "developer"):
            role = "system"
        if msg.get("tool_calls"):
            calls = [
                json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                for c in msg["tool_calls"]
            ]
            content = (content + "\n" if content else "") + "\n".join(
                f"<tool_call>{c}</tool_call>" for c in calls
            )
        if role == "tool":
            role, content = "user", f"<tool_response>{content}</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        described = "\n".join(json.dumps(t["function"]) for t in tools)
        text = _TOOL_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def forced_grammar(tools: list[dict[str, Any]], choice: Any) -> tuple[LlamaGrammar, str | None]:
    """Grammar for a forced tool call: the named tool's arguments, or {name, arguments}."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise ValueError(f"tool_choice names unknown tool {name!r}")
        schema = tool["function"].get("parameters") or {"type": "object"}
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False), name
    if len(tools) == 1:
        return forced_grammar(tools, {"function": {"name": tools[0]["function"]["name"]}})
    schema = {
        "type": "object",
        "properties": {
            "name": {"enum": [t["function"]["name"] for t in tools]},
            "arguments": {"type": "object"},
        },
        "required": ["name", "arguments"],
    }
    return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False), None


class ToolCall(NamedTuple):
    """A tool call the model made: the tool's name and its arguments as JSON text."""

    name: str
    arguments: str


# How templates' models start a tool call: Hermes/Qwen tags, or Llama 3.x bare JSON.
_CALL_STARTS = ("<tool_call>", '{"name"')


def call_or_text(head: str) -> str:
    """'call' or 'text' once the reply's start decides it, else 'undecided'."""
    if any(head.startswith(start) for start in _CALL_STARTS):
        return "call"
    if not head or any(start.startswith(head) for start in _CALL_STARTS):
        return "undecided"
    return "text"


def parse_calls(text: str, forced_name: str | None) -> list[ToolCall]:
    """Tool calls from generated text (forced grammar output or <tool_call> blocks)."""
    if forced_name is not None:
        raw = [{"name": forced_name, "arguments": _loads(text)}]
    else:
        blocks = _TOOL_CALL_RE.findall(text) or ([text] if text.lstrip().startswith("{") else [])
        raw = [d for d in (_loads(b) for b in blocks) if isinstance(d, dict) and "name" in d]
    calls = []
    for item in raw:
        args = item.get("arguments", item.get("parameters")) or {}  # Llama 3.x: "parameters"
        calls.append(
            ToolCall(
                name=str(item["name"]),
                arguments=args if isinstance(args, str) else json.dumps(args),
            )
        )
    if not calls:
        logger.warning("model output was not a valid tool call: %r", text[:200])
    return calls


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}
