"""Contract of appliance/plugins/compat.py: the private livekit-agents and llama-cpp-python
names it wraps exist, with the shapes it uses, in the pinned versions."""

from __future__ import annotations

import inspect
from importlib.metadata import version

from appliance.plugins import compat


def test_the_pinned_versions_are_the_ones_the_contract_was_written_for() -> None:
    assert version("livekit-agents") == "1.8.9"
    assert version("llama-cpp-python") == "0.3.36"


def test_the_streaming_turn_detector_base_has_what_the_smart_turn_plugin_uses() -> None:
    stream = compat.BaseStreamingTurnDetectorStream
    assert inspect.iscoroutinefunction(stream._drain_audio_channel)
    params = inspect.signature(stream._resolve_prediction).parameters
    assert list(params)[:3] == ["self", "request_id", "probability"]
    assert {"inference_duration", "detection_delay"} <= set(params)
    init = inspect.getsource(stream.__init__)
    assert "self._audio_ch" in init and "self._request_id" in init
    assert issubclass(compat.StreamingTurnDetector, object)
    assert inspect.isclass(compat.BaseStreamingTurnDetector)


def test_the_llama_wrappers_reach_the_evaluated_tokens_and_the_output_silencer() -> None:
    from llama_cpp import Llama

    assert isinstance(inspect.getattr_static(Llama, "_input_ids"), property)

    class Evaluated:  # the attribute's shape: a numpy array of token ids
        import numpy as np

        _input_ids = np.array([1, 2, 3], dtype=np.intc)

    assert compat.evaluated_tokens(Evaluated()) == [1, 2, 3]
    with compat.suppress_native_output():
        pass
