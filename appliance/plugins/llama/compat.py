"""The private llama-cpp-python API the llama plugin relies on, in one place (no livekit).

llama-cpp-python 0.3.36 exposes the evaluated tokens (what the KV cache holds) only as
`Llama._input_ids`, and its output silencer only in `llama_cpp._utils`. Both are used through
this module; `tests/test_compat.py` checks them against the pinned version.
"""

from __future__ import annotations

from typing import Any


def evaluated_tokens(llama: Any) -> list[int]:
    """The tokens a `llama_cpp.Llama` has evaluated (its KV cache holds them), in order."""
    tokens: list[int] = llama._input_ids.tolist()  # numpy gives Python ints
    return tokens


def suppress_native_output() -> Any:
    """llama-cpp-python's context manager that silences llama.cpp's stdout/stderr chatter."""
    from llama_cpp._utils import suppress_stdout_stderr

    return suppress_stdout_stderr(disable=False)
