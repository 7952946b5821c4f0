"""ONNX Runtime sessions: provider choice, threading, warm-up.

Providers come from ``settings.providers`` (preference order, e.g. TensorRT ->
CUDA -> CPU) filtered by what the installed ONNX Runtime offers; CPU is always
the last resort.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

#: Size used for a dynamic spatial dimension when warming up.
DEFAULT_DYNAMIC_SIDE = 640

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
}


def select_providers(preferred: list[str]) -> list[str]:
    """``preferred`` filtered by availability, always ending with the CPU provider."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(settings, spinning: bool | None = None) -> ort.SessionOptions:
    """Graph optimisation on; thread counts from settings (0 = ONNX Runtime default).

    Intra-op threads spin between runs only with ``settings.ort_spinning``, unless
    ``spinning`` decides for a model whatever the setting says.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.intra_op_threads > 0:
        options.intra_op_num_threads = settings.intra_op_threads
    if settings.inter_op_threads > 0:
        options.inter_op_num_threads = settings.inter_op_threads
    if not (settings.ort_spinning if spinning is None else spinning):
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def create_session(path: Path | str | bytes, settings) -> ort.InferenceSession:
    """An inference session for a model file (or serialised model bytes)."""
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(
        source,
        sess_options=session_options(settings),
        providers=select_providers(list(settings.providers)),
    )


def providers_in_use(session: ort.InferenceSession) -> list[str]:
    """The providers the session actually runs on, in priority order."""
    return list(session.get_providers())


def static_shape(shape, dynamic_side: int = DEFAULT_DYNAMIC_SIDE) -> list[int]:
    """A concrete shape for an input: batch 1, channels 3 and ``dynamic_side`` elsewhere."""
    concrete = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            concrete.append(dim)
        elif axis == 0:
            concrete.append(1)
        elif axis == 1 and len(shape) == 4:
            concrete.append(3)
        else:
            concrete.append(dynamic_side)
    return concrete


def warm_up(session: ort.InferenceSession, dynamic_side: int = DEFAULT_DYNAMIC_SIDE) -> None:
    """Run one inference on zeros so that the first real request does not pay start-up costs."""
    feed = {
        inp.name: np.zeros(
            static_shape(inp.shape, dynamic_side), dtype=_ORT_DTYPES.get(inp.type, np.float32)
        )
        for inp in session.get_inputs()
    }
    session.run(None, feed)
