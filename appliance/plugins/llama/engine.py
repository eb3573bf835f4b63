"""A local LLM with llama-cpp-python (no livekit here): the model, its requantized copy
kept in the model cache, and the rendering of a chat request for it.

The prompt is built with the model's own chat template (from the GGUF); llama.cpp reuses
the KV cache of the longest unchanged token prefix (system prompt, earlier turns) between
calls. A reply's first words may be sampled ahead, at prefill time (`LocalLlama.speculate`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from appliance.plugins.llama import compat
from appliance.plugins.llama.tools import arguments_as_objects, fold_tools, forced_grammar

if TYPE_CHECKING:
    from numpy.typing import NDArray

logger = logging.getLogger("appliance.llm")

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
            # read into memory, not mapped: the CPU backend repacks most weights into a copy
            # of its own, and with a mapping the file's pages stay resident beside it (the
            # default 1.5B model: 2.25 GB RSS mapped, 1.56 GB read; same speed)
            use_mmap=False,
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
            messages = fold_tools(messages, tools)
            tools = None
        else:
            messages = [arguments_as_objects(m) for m in messages]
        result = self.formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        tokens = self.llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        stop = (
            result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        )
        return tokens, [s for s in stop if s]


@dataclass
class _Ahead:
    """A reply's first tokens, sampled at prefill time for the prompt `prompt`."""

    prompt: list[int]
    ids: list[int]
    text: str
    done: bool  # the reply ended within them


@dataclass
class Request:
    """A chat request rendered for the model: prompt tokens and how to sample."""

    tokens: list[int]
    stop: list[str]
    grammar: LlamaGrammar | None
    forced_name: str | None
    mode: str  # "forced": grammar output is arguments JSON; "undecided": may be <tool_call>


def render_request(
    local: LocalLlama, messages: list[dict[str, Any]], schemas: list[dict[str, Any]], choice: Any
) -> Request:
    """The prompt and sampling setup for `messages` with tools `schemas` and `choice`."""
    choice = choice if schemas else "none"
    if messages and messages[-1].get("role") == "tool":
        choice = "none"  # a forced call is answered once; then the model speaks the result
    forced = choice == "required" or isinstance(choice, dict)
    grammar, forced_name = forced_grammar(schemas, choice) if forced else (None, None)
    offered = schemas if choice not in (None, "none") else None
    tokens, stop = local.prompt(messages, offered)
    mode = "forced" if forced else ("undecided" if offered else "text")
    return Request(tokens, stop, grammar, forced_name, mode)
