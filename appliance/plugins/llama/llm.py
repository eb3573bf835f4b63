"""The local llama.cpp model as a livekit-agents LLM: the adapter over
`engine.LocalLlama`.

Tokens stream from the model's worker thread to the event loop; tool calls the reply makes
(`tools.parse_calls`) become livekit function calls. Cancelling the stream stops generation
at the next token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from typing import Any

from livekit.agents import llm, utils
from livekit.agents.llm import ChatChunk, ChoiceDelta, CompletionUsage, FunctionToolCall
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)
from llama_cpp import Llama

from appliance.observe import trace
from appliance.plugins.llama import compat
from appliance.plugins.llama.engine import SPECULATE, LocalLlama, Request, render_request
from appliance.plugins.llama.tools import ToolCall, call_or_text, parse_calls
from appliance.plugins.priority import Priority

# A `keep_others` prefill does nothing where it would drop more than this many cached
# tokens (another prompt); a few may go (a reply cut short differs by its unspoken end).
_PREFILL_MAY_DROP = 4


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
                    render_request(
                        local, [*messages, {"role": "user", "content": text}], schemas, choice
                    )
                    for text in ("Yes", "No")
                )
                common = Llama.longest_token_prefix(one.tokens, two.tokens)
                request = dataclasses.replace(one, tokens=one.tokens[:common])
            else:
                request = render_request(local, messages, schemas, choice)
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
                render_request(
                    local, [*messages, {"role": "user", "content": said}], schemas, choice
                )
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
        request = render_request(local, messages, schemas, self._choice)
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
                mode = call_or_text(text.lstrip())
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
        self, request: Request, text: str, mode: str, push: Any, usage: tuple[int, int, int]
    ) -> None:
        """Push the tool calls (or undecided text) of a finished reply, then its usage."""
        if not self._cancel.is_set():
            if mode in ("forced", "call"):
                for call in parse_calls(text, request.forced_name):
                    push(("call", _function_call(call)))
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


def _function_call(call: ToolCall) -> FunctionToolCall:
    """A parsed tool call as livekit's function call, with a fresh call id."""
    return FunctionToolCall(
        name=call.name, arguments=call.arguments, call_id=utils.shortuuid("call_")
    )
