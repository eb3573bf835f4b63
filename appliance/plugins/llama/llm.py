"""A local LLM with llama-cpp-python, as a livekit-agents LLM.

Tokens stream from a worker thread to the event loop. The prompt is built with the
model's own chat template (from the GGUF); llama.cpp reuses the KV cache of the longest
unchanged token prefix (system prompt, earlier turns) between calls. Tool calls: a named
or required `tool_choice` is forced with a JSON-schema grammar; with "auto" the model may
answer `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes style), which is
parsed into a livekit function call. Cancelling the stream stops generation at the next
token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from livekit.agents import llm, utils
from livekit.agents.llm import ChatChunk, ChoiceDelta, CompletionUsage, FunctionToolCall
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance.observe import trace
from appliance.plugins import compat
from appliance.plugins.priority import Priority

if TYPE_CHECKING:
    from numpy.typing import NDArray

logger = logging.getLogger("appliance.llm")

_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.S)
_TOOL_PROMPT = (
    "You can call these tools. To call one, reply with only "
    '<tool_call>{{"name": "<tool name>", "arguments": {{...}}}}</tool_call>.\n'
    "Tools:\n{tools}"
)


# a reply's first words (Piper's first chunk): sampled ahead at prefill time (on `threads`:
# the user may still be speaking), or generated in the reply on `first_threads`
SPECULATE = 3

# llama.cpp file types a model may be requantized to ([models] llm_requantize)
REQUANTIZE_TYPES = {"q4_0": 2, "q8_0": 7}  # LLAMA_FTYPE_MOSTLY_*


def requantized(source: Path, source_sha256: str, target: str, cache: Path) -> Path:
    """`source` (a verified GGUF) requantized to `target`, made once and kept in `cache`.

    Why: llama.cpp's CPU backend has no fast kernels for Q4_1, the format SmolLM2 ships
    in: one-thread prompt evaluation ran 1.7x faster as Q8_0 (same answers) and 2.9x as
    Q4_0 (repacked for AVX2/AVX-512 here, NEON on the Pi 5; less precise), bench/README.md.
    The file is named after the source's sha256 and the llama.cpp build, and its own
    sha256 is kept beside it and checked at each load: a damaged copy is made again. Where
    the cache cannot be written, the source is used as it is (logged).
    """
    import llama_cpp

    from appliance.store.disk import derived

    def make(part: Path) -> None:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = REQUANTIZE_TYPES[target]
        params.allow_requantize = True
        t = time.perf_counter()
        with compat.suppress_native_output():  # a line per tensor (default: no-op)
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), params)
        if code != 0:
            raise OSError(f"llama.cpp could not requantize {source.name} to {target}")
        logger.info("requantized %s to %s in %.1f s", source.name, target, time.perf_counter() - t)

    key = f"{source_sha256[:16]}-{llama_cpp.__version__}"
    try:
        return derived(cache / f"{source.stem}.{target}.{key}.gguf", make)
    except OSError as exc:
        logger.warning("using %s as it is: cannot requantize it in %s: %s", source.name, cache, exc)
        return source


# A `keep_others` prefill does nothing where it would drop more than this many cached
# tokens (another prompt); a few may go (a reply cut short differs by its unspoken end).
_PREFILL_MAY_DROP = 4
_MARK_WORTH_PROBING = 0.02
"""A sentence end mark less likely than this next adds too little to be evaluated."""


class LocalLlama:
    """The loaded GGUF model and its chat template: once per process, shared by sessions.

    All generation runs on one worker thread (the executor given to each LlamaLLM), so
    concurrent sessions queue rather than fight over the model and its KV cache.
    """

    def __init__(
        self,
        model_path: str,
        *,
        n_ctx: int,
        threads: int,
        gpu_layers: int = 0,
        first_threads: int = 0,
    ) -> None:
        """`first_threads` (0: as `threads`) generate a reply's first words: the listener
        waits for them, and on a small CPU nothing else runs then (the turn model has run
        in the pause, Piper waits for the words)."""
        self.model_path = model_path
        self.threads = threads
        self.first_threads = first_threads or threads
        self.llama = Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_gpu_layers=gpu_layers,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )
        meta = self.llama.metadata
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"{model_path}: GGUF has no tokenizer.chat_template")
        eos_id = self.llama.token_eos()
        bos_id = self.llama.token_bos()
        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self.llama.detokenize([eos_id], special=True).decode(errors="ignore"),
            bos_token=self.llama.detokenize([bos_id], special=True).decode(errors="ignore")
            if bos_id >= 0
            else "",
            stop_token_ids=[eos_id],
        )
        self.template_has_tools = "tools" in template
        self.ahead: _Ahead | None = None  # a reply's first tokens, sampled at prefill time
        self.request_waiting = threading.Event()  # a request is queued: speculation stops
        self._marks: list[int] | None = None

    def warm(self) -> None:
        """Evaluate a tiny prompt so the first real request pays no first-call costs."""
        for _ in self.llama.create_completion("Hi", max_tokens=1, stream=False):
            pass

    def generation_threads(self, threads: int) -> None:
        """Threads for the tokens generated from now on (worker thread). Prompts keep
        `threads`: two made push-to-talk no faster (bench/README.md, commit e64265e)."""
        if self.llama.n_threads != threads:
            self.llama.n_threads = threads
            llama_cpp.llama_set_n_threads(self.llama.ctx, threads, self.threads)

    def prefill(self, tokens: list[int]) -> int:
        """Evaluate `tokens` into the KV cache (worker thread) so that a request for exactly
        them samples at once; returns how many were evaluated (the cached prefix is kept)."""
        llama = self.llama
        if not tokens:
            return 0
        keep = Llama.longest_token_prefix(compat.evaluated_tokens(llama), tokens)
        if keep == len(tokens) == llama.n_tokens:
            return 0
        llama.n_tokens = keep = min(keep, len(tokens) - 1)  # the last one gives the logits
        llama.eval(tokens[keep:])
        return len(tokens) - keep

    def end_of_turn_probability(self, tokens: list[int], after: int) -> float:
        """P(the user's turn ends within the next two tokens) once `tokens` are evaluated
        (worker thread): with `tokens` a prompt that ends with the user's words and `after`
        the token the chat template closes a user turn with, how sure the model is that the
        user is done (as LiveKit's text end-of-utterance model reads its own model).

        A transcript often lacks its final punctuation, after which a chat model almost
        never ends a turn; so this is P(`after`) plus, for each sentence end mark `p` the
        model finds likely next, P(`p`) x P(`after` | `p`). The evaluated prompt stays in
        the KV cache: the reply's prompt starts with it."""
        llama = self.llama
        keep = Llama.longest_token_prefix(compat.evaluated_tokens(llama), tokens)
        llama.n_tokens = min(keep, len(tokens) - 1)  # the last one gives the logits
        llama.eval(tokens[llama.n_tokens :])
        probs = self._next_token_probabilities()
        total = float(probs[after])
        end = len(tokens)
        for mark in self._sentence_marks():
            if probs[mark] < _MARK_WORTH_PROBING:
                continue
            llama.eval([mark])
            total += float(probs[mark]) * float(self._next_token_probabilities()[after])
            llama.n_tokens = end  # the mark leaves the cache at the next evaluation
        return min(1.0, total)

    def _next_token_probabilities(self) -> NDArray[np.float64]:
        # llama-cpp-python keeps no logits unless every token's are kept: read the context's
        llama = self.llama
        row = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(llama.n_vocab(),)).astype(np.float64)
        logits -= logits.max()
        weights = np.exp(logits)
        return weights / weights.sum()

    def _sentence_marks(self) -> list[int]:
        """The single tokens that end a sentence: ".", "?" or "!", alone or with the line
        breaks a model writes after them (cached)."""
        if self._marks is None:
            marks = set()
            for mark in (".", "?", "!"):
                for tail in ("", "\n", "\n\n"):
                    ids = self.llama.tokenize((mark + tail).encode(), add_bos=False, special=False)
                    if len(ids) == 1:
                        marks.add(ids[0])
            self._marks = sorted(marks)
        return self._marks

    def speculate(
        self, tokens: list[int], stop: list[str], *, temperature: float, words: int
    ) -> None:
        """Sample the first `words` words of the reply to `tokens` (already evaluated) and
        keep them for the request with exactly that prompt (`take_ahead`). Stops early when
        a request is waiting. Worker thread."""
        llama, ids, text, done = self.llama, [], "", False
        self.ahead = None
        eos = llama.token_eos()
        for token in llama.generate(tokens, temp=temperature):  # create_completion's defaults
            if token == eos:
                done = True
                break
            ids.append(token)
            text = llama.detokenize(ids).decode("utf-8", errors="ignore")
            if any(s in text for s in stop):
                text, done = text[: min(text.find(s) for s in stop if s in text)], True
                break
            if len(text.split()) > words or self.request_waiting.is_set():
                break
        if ids or done:
            self.ahead = _Ahead(list(tokens), ids, text, done)

    def take_ahead(self, tokens: list[int]) -> _Ahead | None:
        """The speculated start of the reply to exactly `tokens`, once (worker thread)."""
        ahead, self.ahead = self.ahead, None
        return ahead if ahead is not None and ahead.prompt == tokens else None

    def prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> tuple[list[int], list[str]]:
        """Render messages with the model's template; returns (tokens, stop strings)."""
        if not self.template_has_tools:
            messages = _fold_tools(messages, tools)
            tools = None
        else:
            messages = [_arguments_as_objects(m) for m in messages]
        result = self.formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        tokens = self.llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        stop = (
            result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        )
        return tokens, [s for s in stop if s]


def _arguments_as_objects(msg: dict[str, Any]) -> dict[str, Any]:
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


def _fold_tools(
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


def _forced_grammar(tools: list[dict[str, Any]], choice: Any) -> tuple[LlamaGrammar, str | None]:
    """Grammar for a forced tool call: the named tool's arguments, or {name, arguments}."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tool = next((t for t in tools if t["function"]["name"] == name), None)
        if tool is None:
            raise ValueError(f"tool_choice names unknown tool {name!r}")
        schema = tool["function"].get("parameters") or {"type": "object"}
        return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False), name
    if len(tools) == 1:
        return _forced_grammar(tools, {"function": {"name": tools[0]["function"]["name"]}})
    schema = {
        "type": "object",
        "properties": {
            "name": {"enum": [t["function"]["name"] for t in tools]},
            "arguments": {"type": "object"},
        },
        "required": ["name", "arguments"],
    }
    return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False), None


@dataclass
class _Ahead:
    """A reply's first tokens, sampled at prefill time for the prompt `prompt`."""

    prompt: list[int]
    ids: list[int]
    text: str
    done: bool  # the reply ended within them


@dataclass
class _Request:
    """A chat request rendered for the model: prompt tokens and how to sample."""

    tokens: list[int]
    stop: list[str]
    grammar: LlamaGrammar | None
    forced_name: str | None
    mode: str  # "forced": grammar output is arguments JSON; "undecided": may be <tool_call>


def _render(
    local: LocalLlama, messages: list[dict[str, Any]], schemas: list[dict[str, Any]], choice: Any
) -> _Request:
    """The prompt and sampling setup for `messages` with tools `schemas` and `choice`."""
    choice = choice if schemas else "none"
    if messages and messages[-1].get("role") == "tool":
        choice = "none"  # a forced call is answered once; then the model speaks the result
    forced = choice == "required" or isinstance(choice, dict)
    grammar, forced_name = _forced_grammar(schemas, choice) if forced else (None, None)
    offered = schemas if choice not in (None, "none") else None
    tokens, stop = local.prompt(messages, offered)
    mode = "forced" if forced else ("undecided" if offered else "text")
    return _Request(tokens, stop, grammar, forced_name, mode)


def _openai_request(
    chat_ctx: llm.ChatContext, tools: Sequence[llm.Tool | llm.Toolset]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    messages, _ = chat_ctx.to_provider_format("openai")
    return messages, llm.ToolContext(tools).parse_function_tools("openai", strict=False)


class LlamaLLM(llm.LLM):
    """A per-session LLM over a shared LocalLlama. Construct inside the event loop."""

    def __init__(
        self,
        model: LocalLlama,
        executor: Executor,
        *,
        model_name: str,
        max_tokens: int = 96,
        temperature: float = 0.3,
        tool_choice: llm.ToolChoice | None = None,
        priority: Priority | None = None,
    ) -> None:
        """`priority`: the LLM waits between tokens while a reply's first audio renders."""
        super().__init__()
        self._local = model
        self._priority = priority
        self._executor = executor
        self._model_name = model_name
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._tool_choice = tool_choice

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "llama.cpp"

    def prefill(
        self,
        chat_ctx: llm.ChatContext,
        tools: Sequence[llm.Tool | llm.Toolset] = (),
        *,
        speculate: bool = True,
        upto_user: bool = False,
        keep_others: bool = False,
    ) -> asyncio.Future[int]:
        """Evaluate the prompt of a request with `chat_ctx` and `tools` now, on the LLM's
        worker, so that the request, when it comes, starts sampling at once (llama.cpp
        keeps the longest common token prefix). Push-to-talk calls it with the transcript
        made while the button is still held. It then samples the reply's first words (as
        the request would: same temperature), which the request with exactly this prompt
        takes as its own start (not with `speculate=False`). `upto_user`: only the prompt
        up to where the user's next words will go (the conversation so far and the
        template's start of a user turn); nothing is sampled. `keep_others`: nothing is
        done where it would drop more than `_PREFILL_MAY_DROP` cached tokens (the prompt
        of a request that came in between, another call's). Resolves to the tokens
        evaluated."""
        messages, schemas = _openai_request(chat_ctx, tools)
        local, choice = self._local, self._tool_choice

        def work() -> int:
            if upto_user:  # what two different next questions' prompts have in common
                one, two = (
                    _render(local, [*messages, {"role": "user", "content": text}], schemas, choice)
                    for text in ("Yes", "No")
                )
                common = Llama.longest_token_prefix(one.tokens, two.tokens)
                request = dataclasses.replace(one, tokens=one.tokens[:common])
            else:
                request = _render(local, messages, schemas, choice)
            if keep_others:
                cached = Llama.longest_token_prefix(
                    compat.evaluated_tokens(local.llama), request.tokens
                )
                if local.llama.n_tokens - cached > _PREFILL_MAY_DROP:
                    return 0  # the cache holds another request's prompt (a turn or a call)
            evaluated = local.prefill(request.tokens)
            speculate_now = speculate and not upto_user and request.grammar is None
            if speculate_now and not local.request_waiting.is_set():
                local.speculate(
                    request.tokens, request.stop, temperature=self._temperature, words=SPECULATE
                )
            trace.mark("llm.prefilled")
            return evaluated

        return asyncio.get_running_loop().run_in_executor(self._executor, work)

    def end_of_turn_probability(
        self,
        chat_ctx: llm.ChatContext,
        tools: Sequence[llm.Tool | llm.Toolset],
        text: str,
    ) -> asyncio.Future[float | None]:
        """P(the user's turn ends after `text`, following `chat_ctx` with `tools`: the
        prompt of the reply it would get), from the model's probability of the chat
        template's end-of-user-turn token there; None where the template puts nothing
        recognisable after the user's words. On the LLM's worker."""
        messages, schemas = _openai_request(chat_ctx, tools)
        local, choice = self._local, self._tool_choice

        def work() -> float | None:
            done, more = (
                _render(local, [*messages, {"role": "user", "content": said}], schemas, choice)
                for said in (text, f"{text} and")
            )
            common = Llama.longest_token_prefix(done.tokens, more.tokens)
            if not 0 < common < len(done.tokens):
                return None
            return local.end_of_turn_probability(done.tokens[:common], done.tokens[common])

        return asyncio.get_running_loop().run_in_executor(self._executor, work)

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> LlamaStream:
        choice = tool_choice if utils.is_given(tool_choice) else self._tool_choice
        return LlamaStream(
            self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options, choice=choice
        )


class LlamaStream(llm.LLMStream):
    def __init__(
        self,
        owner: LlamaLLM,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
        choice: llm.ToolChoice | None,
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._owner = owner
        self._choice = choice
        self._cancel = threading.Event()

    def _generate(
        self, messages: list[dict[str, Any]], schemas: list[dict[str, Any]], push: Any
    ) -> None:
        """Worker thread: render, generate, push ('text'|'call'|'usage', value) items."""
        local, priority = self._owner._local, self._owner._priority
        local.request_waiting.clear()
        request = _render(local, messages, schemas, self._choice)
        tokens, mode = request.tokens, request.mode
        cached = Llama.longest_token_prefix(compat.evaluated_tokens(local.llama), tokens)
        trace.mark("llm.start")
        ahead = local.take_ahead(tokens)  # any request consumes it; a grammar cannot use it
        if request.grammar is not None:
            ahead = None
        text, completion_tokens = "", 0

        def take(piece: str, count: int) -> None:
            nonlocal text, mode, completion_tokens
            if not completion_tokens:
                trace.mark("llm.first_token")
            completion_tokens += count
            text += piece
            if mode == "undecided":
                mode = _call_or_text(text.lstrip())
                if mode == "text":
                    push(("text", text))
            elif mode == "text" and piece:
                push(("text", piece))

        if ahead is not None:  # sampled at prefill time for exactly this prompt
            take(ahead.text, len(ahead.ids))
            if ahead.done or len(ahead.ids) >= self._owner._max_tokens:
                self._finish(request, text, mode, push, (len(tokens), cached, completion_tokens))
                return
        stream: Iterator[Any] = local.llama.create_completion(  # type: ignore[assignment]
            tokens + (ahead.ids if ahead is not None else []),
            max_tokens=self._owner._max_tokens - (len(ahead.ids) if ahead is not None else 0),
            temperature=self._owner._temperature,
            stop=request.stop,
            grammar=request.grammar,
            stream=True,
        )
        first_words = len(text.split()) <= SPECULATE  # Piper's first chunk is still to come
        if first_words:
            local.generation_threads(local.first_threads)
        try:
            for chunk in stream:
                if self._cancel.is_set():
                    break
                take(chunk["choices"][0]["text"], 1)
                if first_words and len(text.split()) > SPECULATE:  # the first chunk is out
                    first_words = False
                    local.generation_threads(local.threads)
                if priority is not None:
                    priority.wait_turn()  # before the next token: a first audio may render
        finally:
            local.generation_threads(local.threads)
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self._finish(request, text, mode, push, (len(tokens), cached, completion_tokens))

    def _finish(
        self, request: _Request, text: str, mode: str, push: Any, usage: tuple[int, int, int]
    ) -> None:
        """Push the tool calls (or undecided text) of a finished reply, then its usage."""
        if not self._cancel.is_set():
            if mode in ("forced", "call"):
                for call in _parse_calls(text, request.forced_name):
                    push(("call", call))
            elif mode == "undecided" and text.strip():
                push(("text", text))
        push(("usage", usage))

    async def _run(self) -> None:
        messages, schemas = _openai_request(self._chat_ctx, self._tools)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()

        def push(item: tuple[str, Any] | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._generate(messages, schemas, push)
            finally:
                push(None)

        request_id = utils.shortuuid("llama_")
        self._owner._local.request_waiting.set()  # a speculation running stops for this
        future = loop.run_in_executor(self._owner._executor, work)
        try:
            while (item := await queue.get()) is not None:
                kind, value = item
                if kind == "text":
                    delta = ChoiceDelta(role="assistant", content=value)
                    self._event_ch.send_nowait(ChatChunk(id=request_id, delta=delta))
                elif kind == "call":
                    delta = ChoiceDelta(role="assistant", tool_calls=[value])
                    self._event_ch.send_nowait(ChatChunk(id=request_id, delta=delta))
                else:
                    prompt_tokens, cached, completion_tokens = value
                    usage = CompletionUsage(
                        completion_tokens=completion_tokens,
                        prompt_tokens=prompt_tokens,
                        prompt_cached_tokens=cached,
                        total_tokens=prompt_tokens + completion_tokens,
                    )
                    self._event_ch.send_nowait(ChatChunk(id=request_id, usage=usage))
            await future  # re-raise errors from the worker
        finally:
            self._cancel.set()  # interrupted: the worker stops at its next token


# How templates' models start a tool call: Hermes/Qwen tags, or Llama 3.x bare JSON.
_CALL_STARTS = ("<tool_call>", '{"name"')


def _call_or_text(head: str) -> str:
    """'call' or 'text' once the reply's start decides it, else 'undecided'."""
    if any(head.startswith(start) for start in _CALL_STARTS):
        return "call"
    if not head or any(start.startswith(head) for start in _CALL_STARTS):
        return "undecided"
    return "text"


def _parse_calls(text: str, forced_name: str | None) -> list[FunctionToolCall]:
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
            FunctionToolCall(
                name=str(item["name"]),
                arguments=args if isinstance(args, str) else json.dumps(args),
                call_id=utils.shortuuid("call_"),
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
