"""Recognition: aligned crops -> L2-normalised embeddings with an ONNX model.

Preprocessing (colour order, mean/std, layout, input size) comes from the card.
Models with a symbolic batch dimension get the crops in batches of up to
``settings.max_batch``; fixed-batch models get fixed-size chunks. Optional flip
augmentation sums the embeddings of each crop and its mirror image before
normalising: on when the card's thresholds were calibrated so (``extra.flip_augment``),
unless ``settings.flip_augment`` (``FACEGATE_FLIP_AUGMENT``) or the caller says otherwise.
Flip-augmented embeddings are not those of the plain model: their model id carries
``+flip`` (:func:`embedding_model_id`), so a gallery never mixes the two.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .runtime import create_session, warm_up

if TYPE_CHECKING:
    from service.config import Settings
    from service.registry import ModelCard, Preprocessing


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def card_flip(card: ModelCard) -> bool:
    """Whether the card's thresholds were calibrated on flip-augmented embeddings."""
    return bool((card.extra or {}).get("flip_augment", False))


def embedding_model_id(card: ModelCard, flip: bool) -> str:
    """The id embeddings are tagged with: the card's, ``+flip`` when flip-augmented."""
    return f"{card.id}+flip" if flip else card.id


def served_flip(card: ModelCard, settings: Settings) -> bool:
    """Whether ``settings`` embed with ``card`` flip-augmented: ``FACEGATE_FLIP_AUGMENT``
    when set, else as the card's thresholds were calibrated."""
    return card_flip(card) if settings.flip_augment is None else settings.flip_augment


def served_model_id(card: ModelCard, settings: Settings) -> str:
    """The model id a service with ``settings`` tags ``card``'s embeddings with (what its
    galleries hold), without loading the model."""
    return embedding_model_id(card, served_flip(card, settings))


class OnnxEmbedder:
    """``Embedder`` over an ONNX recognition model described by ``card``."""

    def __init__(
        self, card: ModelCard, path: Path | str, settings: Settings, flip: bool | None = None
    ) -> None:
        if card.task != "recognition":
            raise ValueError(f"model {card.name!r} is a {card.task} model, not a recognizer")
        self.card = card
        if flip is None:
            flip = served_flip(card, settings)
        self.flip = bool(flip)
        self.model_id = embedding_model_id(card, self.flip)
        self.session = create_session(path, settings)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        pre = card.preprocessing
        self.layout = pre.layout
        shape = list(inp.shape)
        batch_dim = shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.max_batch = self.fixed_batch or max(1, int(settings.max_batch))
        spatial = shape[2:4] if self.layout == "NCHW" else shape[1:3]
        if pre.input_size is not None:
            self.input_size = (int(pre.input_size[0]), int(pre.input_size[1]))
        elif all(isinstance(d, int) and d > 0 for d in spatial):
            self.input_size = (int(spatial[1]), int(spatial[0]))
        else:
            self.input_size = (112, 112)
        self.swap_rb = pre.color == "RGB"
        self.mean = np.asarray(pre.mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(pre.std, dtype=np.float32)
        out_dim = self.session.get_outputs()[0].shape[-1]
        self.dim = int(card.embedding_dim or out_dim)
        if isinstance(out_dim, int) and out_dim != self.dim:
            raise ValueError(f"{card.name}: card says dim {self.dim}, model outputs {out_dim}")
        warm_up(self.session, dynamic_side=self.input_size[0])

    def with_preprocessing(self, pre: Preprocessing) -> OnnxEmbedder:
        """The same model (one session, shared) under another colour order and mean/std:
        how ``facegate models add`` tries preprocessing candidates without reloading it."""
        other = copy.copy(self)
        other.swap_rb = pre.color == "RGB"
        other.mean = np.asarray(pre.mean, dtype=np.float32)
        other.inv_std = 1.0 / np.asarray(pre.std, dtype=np.float32)
        return other

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        """(N, h, w, 3) uint8 BGR -> model input (float32, card's colour/mean/std/layout)."""
        width, height = self.input_size
        if crops.shape[1:3] != (height, width):
            crops = np.stack(
                [cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in crops]
            )
        batch = crops[..., ::-1] if self.swap_rb else crops
        batch = (batch.astype(np.float32) - self.mean) * self.inv_std
        if self.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(batch)

    def _forward(self, blob: np.ndarray) -> np.ndarray:
        outputs = []
        step = self.max_batch
        for start in range(0, blob.shape[0], step):
            chunk = blob[start : start + step]
            real = chunk.shape[0]
            if self.fixed_batch and real < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outputs.append(out.reshape(out.shape[0], -1)[:real])
        return np.concatenate(outputs).astype(np.float32, copy=False)

    def embed(self, crops: np.ndarray, flip: bool | None = None) -> np.ndarray:
        """(N, h, w, 3) uint8 BGR aligned crops -> (N, dim) float32, L2-normalised."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        use_flip = self.flip if flip is None else flip
        vectors = self._forward(self.preprocess(crops))
        if use_flip:
            vectors = vectors + self._forward(self.preprocess(crops[:, :, ::-1]))
        return l2_normalize(vectors)
