"""ONNX export with a model card the service loads unchanged, and a parity check that can fail.

``export(checkpoint, out_dir/name.onnx, parity_images)``:

1. rebuilds the backbone from the checkpoint's config and exports it to ONNX
   (input ``input`` N×3×112×112 with a dynamic batch, output ``embedding``);
2. runs the **parity check** on real aligned faces: ONNX Runtime (CPU) against
   PyTorch (float32, eval mode), reporting the max-abs difference and the
   minimum cosine; above tolerance the ONNX file is deleted and
   :class:`ExportError` raised;
3. writes ``<name>.card.json`` beside it (the service's ``ModelCard`` schema):
   the backbone's input contract (:mod:`training.contract`: RGB, mean 127.5, std
   128 and the ArcFace 112×112 template for this package's own networks, the
   pretrained model's card for a fine-tuned one, e.g. dlib's 150×150 chip), the
   backbone's input side (the service resizes its aligned crops to it exactly as
   training did), embedding dim, loss and its parameters, training data,
   evaluation results and FMR-calibrated thresholds, and the file's sha256.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from training.backbones import build_backbone
from training.contract import input_contract
from training.data import resize


class ExportError(RuntimeError):
    """The exported model does not reproduce the PyTorch model (or cannot be exported)."""


def input_size_of(state: dict) -> int:
    """The backbone's input side recorded in a checkpoint's config."""
    cfg = state["config"]
    return int(cfg["backbone"].get("params", {}).get("input_size", cfg["data"].get("size", 112)))


def load_backbone(checkpoint: Path | str) -> tuple[torch.nn.Module, dict]:
    """(backbone in eval mode, checkpoint dict) from a training checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["config"]["backbone"]
    params = {**cfg.get("params", {}), "input_size": input_size_of(state)}
    model = build_backbone(cfg["name"], cfg["embedding_dim"], **params)
    model.load_state_dict(state["backbone"])
    return model.eval(), state


def to_onnx(model: torch.nn.Module, path: Path, input_size: int = 112, opset: int = 17) -> None:
    """Export with a dynamic batch axis (TorchScript exporter: no extra dependencies)."""
    # Module.to takes memory_format at run time; torch's stubs omit it from the overloads
    model = (
        model.eval()
        .float()
        .to(  # type: ignore[call-overload]
            memory_format=torch.contiguous_format
        )
    )
    dummy = torch.zeros(2, 3, input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["embedding"],
            opset_version=opset,
            dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
            dynamo=False,
        )


def parity_check(
    model: torch.nn.Module,
    onnx_path: Path,
    crops: np.ndarray,
    max_abs_tol: float = 1e-3,
    min_cosine: float = 0.99999,
    mean=127.5,
    std=128.0,
) -> dict:
    """ONNX Runtime vs PyTorch on ``crops`` ((N, H, W, 3) uint8 BGR aligned faces), normalised
    ``(rgb - mean) / std`` (the model's input contract)."""
    import onnxruntime as ort

    if len(crops) == 0:
        raise ExportError("parity check needs at least one aligned face")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    side = session.get_inputs()[0].shape[2]
    crops = np.stack([resize(c, side if isinstance(side, int) else None) for c in crops])
    rgb = np.ascontiguousarray(crops[..., ::-1], dtype=np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    blob = ((rgb - mean) / std).transpose(0, 3, 1, 2).copy()
    with torch.inference_mode():
        reference = model.eval()(torch.from_numpy(blob)).numpy()
    got = session.run(["embedding"], {"input": blob})[0]
    max_abs = float(np.max(np.abs(got - reference)))
    scale = float(np.max(np.abs(reference)))
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    cos = np.sum(got * reference, 1) / norms
    result = {
        "faces": len(crops),
        "max_abs_diff": max_abs,
        "max_abs_output": scale,
        "min_cosine": float(np.min(cos)),
        "max_abs_tolerance": max_abs_tol,
        "min_cosine_tolerance": min_cosine,
        "batch": len(crops),
    }
    if not (max_abs <= max_abs_tol * max(1.0, scale) and result["min_cosine"] >= min_cosine):
        raise ExportError(
            f"ONNX parity failed: max |onnx - torch| = {max_abs:.3g} "
            f"(tolerance {max_abs_tol * max(1.0, scale):.3g}), min cosine "
            f"{result['min_cosine']:.7f} (tolerance {min_cosine})"
        )
    return result


def build_card(
    name: str,
    onnx_path: Path,
    state: dict,
    evaluation: dict | None = None,
    thresholds: dict | None = None,
    description: str = "",
    licence: str = "",
    commercial_use: bool = False,
    training_extra: dict | None = None,
    input_size: int = 112,
) -> dict:
    """The card dict (validated against the service's ``ModelCard`` schema)."""
    from service.registry import ModelCard, sha256_file

    cfg = state["config"]
    contract = input_contract(cfg["backbone"]["name"])
    history = state.get("history", [])
    training = {
        "backbone": cfg["backbone"],
        "loss": cfg["loss"],
        "optimizer": cfg["optim"],
        "data": {
            "root": cfg["data"]["root"],
            "format": cfg["data"]["format"],
            "identities": len(state["classes"]) if state.get("classes") else None,
            "augmentation": {
                k: cfg["data"][k] for k in ("flip", "brightness", "contrast", "grayscale")
            },
        },
        "epochs": state.get("epoch"),
        "steps": state.get("step"),
        "batch_size": cfg["batch_size"],
        "world_size": state.get("world_size"),
        "amp": cfg["amp"],
        "seed": cfg["seed"],
        "init": cfg.get("init"),
        "final_epoch_loss": history[-1]["loss"] if history else None,
        **(training_extra or {}),
    }
    card = ModelCard(
        name=name,
        task="recognition",
        family="arcface" if contract.source == "arcface" else "dlib",
        file=onnx_path.name,
        sha256=sha256_file(onnx_path),
        source="trained with facegate-train",
        licence=licence,
        commercial_use=commercial_use,
        description=description,
        **contract.card_fields(input_size),
        embedding_dim=int(cfg["backbone"]["embedding_dim"]),
        thresholds=thresholds or {},
        default_operating_point="fmr_1e-3" if thresholds and "fmr_1e-3" in thresholds else None,
        evaluation=evaluation or {},
        training=training,
    )
    return json.loads(card.model_dump_json())


def export(
    checkpoint: Path | str,
    onnx_path: Path | str,
    parity_crops: np.ndarray,
    name: str | None = None,
    evaluation: dict | None = None,
    thresholds: dict | None = None,
    **card_fields,
) -> dict:
    """Export, parity-check and write the card; returns ``{"onnx", "card", "parity"}``."""
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model, state = load_backbone(checkpoint)
    input_size = input_size_of(state)
    to_onnx(model, onnx_path, input_size)
    try:
        contract = input_contract(state["config"]["backbone"]["name"])
        parity = parity_check(model, onnx_path, parity_crops, mean=contract.mean, std=contract.std)
    except ExportError:
        onnx_path.unlink(missing_ok=True)
        raise
    evaluation = dict(evaluation or {})
    evaluation["onnx_parity"] = parity
    card = build_card(
        name or onnx_path.stem,
        onnx_path,
        state,
        evaluation,
        thresholds,
        input_size=input_size,
        **card_fields,
    )
    card_path = onnx_path.with_name(onnx_path.stem + ".card.json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return {"onnx": str(onnx_path), "card": str(card_path), "parity": parity}
