"""Training checkpoints: one self-contained directory per saved step, written atomically.

This is the format the later stages (fold, ONNX export, generate) read, through
``load_model(path) -> (model, meta)``. A checkpoint directory holds::

    model.safetensors   the model's state_dict, tied embeddings stored once
                        (safetensors refuses shared tensors; save_model dedupes them);
                        TaperNorm buffers ``gate``, ``c``, ``tapering`` and the
                        calibration EMAs are part of it, so loading restores them.
    config.json         {"format": 1,
                         "model": the ModelSource's to_dict() (a reference ModelConfig
                                  or a Hugging Face source; taperfx.models.source_from_dict),
                         "protocol": "baseline" | "internal" | "all",
                         "step": optimizer steps taken,
                         "final": true for the checkpoint written at the end of a run,
                         "gate": the global gate (null for baseline),
                         "gate_zero": true when every TaperNorm sits at g = 0,
                         "schedule": GateSchedule.state_dict() (null for baseline),
                         "tokenizer": the tokenizer file's name,
                         "val_loss": validation loss (at g = 0 once tapering) or null,
                         "train": the TrainConfig that produced it}
    tokenizer.model     a copy of the data's tokenizer, so the directory stands alone
                        (tokenizer.json for data tokenized by a Hugging Face tokenizer).
    trainer_state.pt    optimizer, LR schedule, RNG and scale-anchor state: only ``--resume`` needs it.

A run directory keeps its checkpoints in ``checkpoints/step-NNNNNNN``. Each is built
under a temporary name and renamed into place, so a crash leaves either the old set
or the new one, never a half-written checkpoint.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from taperfx.atomic import atomic_dir, torch_save
from taperfx.convert import convert, gate_of
from taperfx.errors import BadInput, DataError, InputNotFound
from taperfx.jsonfile import read_json_object
from taperfx.kinds import Protocol
from taperfx.models import source_from_dict

__all__ = [
    "FORMAT_VERSION",
    "PROTOCOLS",
    "save_checkpoint",
    "load_model",
    "load_weights",
    "read_meta",
    "load_trainer_state",
    "resolve_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
]

FORMAT_VERSION = 1
PROTOCOLS = tuple(p.value for p in Protocol)
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "step-"


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    meta: dict,
    tokenizer: str | os.PathLike,
    trainer_state: dict | None = None,
) -> Path:
    """Write ``root/checkpoints/step-NNNNNNN`` atomically and return its path.

    ``meta`` carries the keys documented above except those derived here from the
    model (``gate``, ``gate_zero``, ``step``, ``tokenizer``, ``format``).
    """
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise InputNotFound(f"tokenizer model {tokenizer} does not exist; cannot write a self-contained checkpoint")
    if meta.get("protocol") not in PROTOCOLS:
        raise BadInput(f"meta['protocol'] must be one of {PROTOCOLS}, got {meta.get('protocol')!r}")
    ckpt_root = Path(root) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{_PREFIX}{step:07d}"
    gate = gate_of(model)
    config = {
        **meta,
        "format": FORMAT_VERSION,
        "step": int(step),
        "gate": gate,
        "gate_zero": gate == 0.0,
        "tokenizer": tokenizer.name,
    }
    with atomic_dir(final) as tmp:  # re-saving a step (a resumed run reaching it again) swaps it whole
        try:
            safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        except SafetensorError as exc:  # safetensors reports a failed write (disk full, file-size limit) as its own
            raise OSError(errno.EIO, f"safetensors could not write {MODEL_FILE}: {exc}") from exc
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / tokenizer.name)
        if trainer_state is not None:
            torch_save(trainer_state, tmp / STATE_FILE)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The finished checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory as given, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise InputNotFound(f"{path} is neither a checkpoint directory (no {CONFIG_FILE}) nor a run with checkpoints")


def read_meta(path: str | os.PathLike) -> dict:
    """``config.json`` of a checkpoint, checked, with ``path`` and ``tokenizer_path`` made absolute."""
    ckpt = resolve_checkpoint(path)
    meta = read_json_object(ckpt / CONFIG_FILE)
    missing = {"format", "model", "protocol", "step", "gate_zero", "tokenizer"} - set(meta)
    if missing:
        raise DataError(f"checkpoint {ckpt}: {CONFIG_FILE} lacks {sorted(missing)}")
    if meta["format"] != FORMAT_VERSION:
        raise DataError(f"checkpoint {ckpt} has format {meta['format']}, this taperfx reads {FORMAT_VERSION}")
    if meta["protocol"] not in PROTOCOLS:
        raise DataError(f"checkpoint {ckpt}: unknown protocol {meta['protocol']!r}")
    try:  # checked once here, so that every reader of the record may build from it
        source_from_dict(meta["model"])
    except (TypeError, ValueError) as exc:
        raise DataError(f"checkpoint {ckpt}: the model record of {CONFIG_FILE} is damaged ({exc})") from exc
    for key, kind in (("tokenizer", str), ("train", (dict, type(None)))):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"checkpoint {ckpt}: {CONFIG_FILE} holds {key}={meta[key]!r}, not a {key} record")
    tokenizer = ckpt / meta["tokenizer"]
    if not tokenizer.is_file():
        raise InputNotFound(f"checkpoint {ckpt}: tokenizer {tokenizer.name} is missing")
    return {**meta, "path": str(ckpt), "tokenizer_path": str(tokenizer)}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint (or of a run's latest) with gate and calibration restored.

    Returns ``(model, meta)``: the model in eval mode, converted per its protocol
    (``internal``/``all``) before its weights are loaded, so every TaperNorm comes
    back with its ``c``, ``γ̃`` and gate; ``meta`` is ``read_meta(path)``.
    """
    meta = read_meta(path)
    ckpt = Path(meta["path"])
    if meta.get("folded") is not None:  # written by taperfx.checkpoint_fold: the norms are in the weights
        raise BadInput(
            f"checkpoint {ckpt} is folded (its norms are in the weights); "
            "load it with taperfx.checkpoint_fold.load_folded_checkpoint",
            code="checkpoint-folded",
        )
    model = source_from_dict(meta["model"]).build_architecture()
    if meta["protocol"] != "baseline":
        convert(model, meta["protocol"])
    load_weights(model, ckpt, device)
    return model.to(device).eval(), meta


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load ``ckpt/model.safetensors`` into ``model`` (strict), with a clear error when damaged."""
    weights = ckpt / MODEL_FILE
    if not weights.is_file():
        raise InputNotFound(f"checkpoint {ckpt}: {MODEL_FILE} is missing")
    try:
        safetensors.torch.load_model(model, str(weights), strict=True, device=str(device))
    except (SafetensorError, RuntimeError) as exc:
        raise DataError(
            f"checkpoint {ckpt}: cannot load {MODEL_FILE} ({exc}); the file is truncated or corrupt"
        ) from exc


def load_trainer_state(path: str | os.PathLike) -> dict:
    """The resume state of a checkpoint (optimizer, LR schedule, RNG, anchor)."""
    ckpt = resolve_checkpoint(path)
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise InputNotFound(f"checkpoint {ckpt} has no {STATE_FILE}; it cannot be resumed")
    try:
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several unrelated types for a damaged file
        raise DataError(f"checkpoint {ckpt}: {STATE_FILE} is truncated or corrupt ({exc})") from exc


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the one with the lowest val loss."""
    if keep_last < 1:
        raise BadInput(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    scored = [(read_json_object(p / CONFIG_FILE).get("val_loss"), p) for p in found]
    # A tapered model evaluated at g = 0 early in the taper can overflow (its c was frozen
    # when the residual stream was still small): such a NaN/inf is never "best".
    scored = [(v, p) for v, p in scored if v is not None and math.isfinite(v)]
    if scored:
        keep.add(min(scored, key=lambda vp: vp[0])[1])
    for p in found:
        if p not in keep:
            shutil.rmtree(p)
