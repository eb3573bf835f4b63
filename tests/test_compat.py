"""Contract of the compat modules: the private livekit-agents names `appliance/plugins/compat.py`
wraps and the llama-cpp-python ones `appliance/plugins/llama/compat.py` wraps exist, with the
shapes they use, in the pinned versions."""

from __future__ import annotations

import inspect
from importlib.metadata import version

from appliance.plugins import compat
from appliance.plugins.llama import compat as llama_compat


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

    assert llama_compat.evaluated_tokens(Evaluated()) == [1, 2, 3]
    with llama_compat.suppress_native_output():
        pass


ENGINES = [
    "appliance.plugins.whisper.engine",
    "appliance.plugins.llama.engine",
    "appliance.plugins.llama.tools",
    "appliance.plugins.piper.engine",
    "appliance.plugins.piper.text",
    "appliance.plugins.smart_turn.engine",
]


def test_the_model_engines_load_without_livekit() -> None:
    """Each engine module stands alone; only the plugin adapters import livekit."""
    import subprocess
    import sys

    code = (
        "import importlib, sys\n"
        f"for name in {ENGINES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('livekit')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
