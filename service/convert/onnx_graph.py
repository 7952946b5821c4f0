"""A small ONNX graph builder shared by the converters (MTCNN, dlib ResNet).

A builder accumulates nodes and initializers; subclasses choose how names are made
(:class:`PrefixedGraph`: ``prefix/name``; :class:`CountedGraph`: ``name_001``, ...), so a
converter's output stays byte-for-byte deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Nodes and initializers of one graph under construction."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def name(self, base: str) -> str:
        """The graph name for ``base`` (one call, one name)."""
        raise NotImplementedError

    def const(self, base: str, value: np.ndarray) -> str:
        """Add ``value`` as an initializer; return its name."""
        full = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), full))
        return full

    def node(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        """Add one single-output node; return its output's name (also the node's name)."""
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


class PrefixedGraph(GraphBuilder):
    """Names ``prefix/base``: each base used once per prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def name(self, base: str) -> str:
        return f"{self.prefix}/{base}"


class CountedGraph(GraphBuilder):
    """Names ``base_001``, ``base_002``, ...: one counter over the whole graph."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = 0

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter:03d}"
