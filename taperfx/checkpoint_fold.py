"""Fold a gate-zero checkpoint on disk, at any size: plan on a meta model, stream the shards.

``fold_checkpoint`` is what ``taperfx fold CHECKPOINT_DIR --out DIR`` calls. It
glues the stages the generic passes must not import: the checkpoint's record of
its model (``taperfx.train``), the model built on the meta device with its
TaperNorms (``taperfx.convert``) and exported (``taperfx.export`` for the
reference decoders; the transformers model itself for a run started from a
Hugging Face checkpoint). ``taperfx.passes.meta_plan`` turns that export into a
``FoldPlan`` named by checkpoint keys, ``taperfx.passes.stream`` applies it shard
by shard, and a spot check of a few folded layers against a float64 evaluation of
the original ones runs before the result is published.

What comes out:

- a run of a reference decoder (``llama``/``gpt2``): a taperfx checkpoint directory
  whose ``config.json`` records the fold under ``"folded"`` (norms now identity,
  heads untied, biases added); ``load_folded_checkpoint`` rebuilds the norm-free model;
- a run started from a transformers model (``--init-from hf:``): a plain
  transformers directory (``config.json`` with ``taperfx_identity_norms`` and
  ``taperfx_added_biases``) that ``taperfx.hf.load_folded`` loads, as ``export-hf`` writes.

Memory: the plan (a few vectors per norm) and two blocks of rows; never a weight.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from taperfx.convert import convert
from taperfx.errors import BadInput, DataError, TaperfxError, WouldOverwrite
from taperfx.jsonfile import read_json_object
from taperfx.kinds import Protocol
from taperfx.models.hf_source import HFSource
from taperfx.models.source import source_from_dict
from taperfx.norms import TaperNorm
from taperfx.passes.fold_plan import FoldPlan
from taperfx.passes.journal import JOURNAL_DIR, has_journal, stream_fold_in_place
from taperfx.passes.meta_plan import plan_from_program
from taperfx.passes.report import FoldReport
from taperfx.passes.shards import INDEX_FILE, ShardReader, ShardWriter, checkpoint_files
from taperfx.passes.stream import SpotCheck, StreamStats, spot_check, stream_fold
from taperfx.train.checkpoint import CONFIG_FILE, load_model, read_meta

__all__ = [
    "FOLDED_KEY",
    "CheckpointFold",
    "fold_checkpoint",
    "CheckpointPlan",
    "plan_checkpoint",
    "load_folded_checkpoint",
    "load_inference_model",
]

FOLDED_KEY = "folded"  # config.json record of a folded taperfx checkpoint
_HF_PREFIX = "hf."  # HFCausalLM keeps the transformers model under .hf


@dataclass
class CheckpointFold:
    """What ``fold_checkpoint`` did: the fold report, the bytes it moved, the spot checks, where it wrote."""

    out: Path
    report: FoldReport
    stats: StreamStats
    checks: list[SpotCheck] = field(default_factory=list)
    hf: bool = False
    plan: FoldPlan | None = None

    def __str__(self) -> str:
        lines = [str(self.report).splitlines()[0].split(";")[0]]
        lines += [f"  folded  {f.name} ({f.kind}) -> {', '.join(f.weights)}" for f in self.report.folded]
        lines += [f"  kept    {s.name}: {s.reason}" for s in self.report.skipped]
        lines.append(
            f"weights rewritten {_size(self.stats.folded_bytes)}, copied unchanged {_size(self.stats.copied_bytes)}"
        )
        if self.checks:
            worst = max(self.checks, key=lambda c: c.max_error / c.tolerance)
            lines.append(
                f"spot check: {len(self.checks)} folded layer(s) match the original in float64 "
                f"(worst error {worst.max_error:.2g}, rounding allows {worst.tolerance:.2g})"
            )
        kind = "transformers directory (taperfx.hf.load_folded)" if self.hf else "taperfx checkpoint"
        lines.append(f"wrote {self.out} ({kind})")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _is_hf(meta: dict) -> bool:
    return HFSource.recorded_in(meta["model"])


def _refuse_folded(meta: dict) -> None:
    """A checkpoint this module already folded has nothing left to fold: say so before anything is read."""
    hf_folded = _is_hf(meta) and "taperfx_identity_norms" in source_from_dict(meta["model"]).config
    if FOLDED_KEY in meta or hf_folded:
        raise BadInput(f"checkpoint {meta['path']} is already folded", code="already-folded")


def _read_source(path: str | os.PathLike) -> dict:
    """The record of what ``path`` holds, in ``read_meta``'s form: a taperfx checkpoint (or run), or a
    transformers directory (``save_pretrained`` of a converted model: its TaperNorms' state is in the
    weights, ``*.weight_tilde``, ``*.gate``; protocol and gate are read from there)."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    config = read_json_object(config_file) if config_file.is_file() else {}
    if "model_type" not in config or "format" in config:
        return read_meta(path)
    files = checkpoint_files(path)
    tapered = sorted(k.removesuffix(".weight_tilde") for k in files if k.endswith(".weight_tilde"))
    if not tapered:
        raise ValueError(
            f"{path}: a transformers directory without TaperNorm state (no *.weight_tilde): nothing to fold"
        )
    vectors = _Vectors(path, files)
    try:
        gates = sorted({float(vectors(f"{name}.gate")) for name in tapered})
    except KeyError as exc:
        raise ValueError(f"{path}: a TaperNorm without its gate ({exc}); the checkpoint is incomplete") from exc
    finally:
        vectors.close()
    return {
        "path": str(path),
        "model": HFSource(path, config).to_dict(),
        "protocol": None,  # decided by which norms carry TaperNorm state (_meta_model)
        "tapered": tapered,
        "gate": gates[0] if len(gates) == 1 else gates,
        "gate_zero": gates == [0.0],
        "hf_directory": True,
    }


def _meta_model(meta: dict) -> nn.Module:
    """The checkpoint's architecture on the meta device, converted per its protocol (no weight memory).

    A transformers directory records no protocol: the one whose TaperNorms are the
    directory's is chosen (and written into ``meta``)."""
    if meta["protocol"] is None:
        for protocol in Protocol.tapering():
            model = _meta_model({**meta, "protocol": protocol})
            if _tapered_names(model) == meta["tapered"]:
                meta["protocol"] = str(protocol)
                return model
        raise ValueError(f"{meta['path']}: its TaperNorms {meta['tapered']} match neither protocol (internal, all)")
    with torch.device("meta"):
        model = source_from_dict(meta["model"]).build_architecture()
    if meta["protocol"] != "baseline":
        _materialize_vectors(model)  # convert() recognises norm-like modules by probing them
        convert(model, meta["protocol"])
    return model.to("meta")


@torch.no_grad()
def _materialize_vectors(model: nn.Module) -> None:
    """Give leaf modules whose parameters are all vectors real CPU memory (weight 1, the rest 0).

    A norm is such a module; the values do not matter (the checkpoint's come later), only
    that ``convert`` can run its probe on them. Everything else stays on the meta device.
    """
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params and not list(module.children()) and all(p.dim() <= 1 for p in params):
            module.to_empty(device="cpu", recurse=False)
            for name, p in module.named_parameters(recurse=False):
                p.fill_(1.0 if name == "weight" else 0.0)


def _tapered_names(model: nn.Module) -> list[str]:
    """Module paths of the TaperNorms, as the checkpoint's keys name them (without HFCausalLM's prefix)."""
    return sorted(name.removeprefix(_HF_PREFIX) for name, m in model.named_modules() if isinstance(m, TaperNorm))


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """``{name: every name of the same tensor}`` (tied weights have several)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups[id(tensor)].append(name)
    return {name: names for names in groups.values() for name in names}


def _source_keys(model: nn.Module, keys: set[str], strip: str) -> dict[str, str]:
    """``{model name: checkpoint key}``: the name (less ``strip``), or the alias under which a tied tensor
    was saved."""
    found = {}
    for name, names in _aliases(model).items():
        present = [n.removeprefix(strip) for n in names if n.removeprefix(strip) in keys]
        if present:
            found[name] = present[0]
    return found


class _Vectors:
    """Reads the small tensors the planner asks for from the shards (each file opened once)."""

    def __init__(self, directory: Path, files: dict[str, str]) -> None:
        self.directory, self.files, self._readers = directory, files, {}

    def __call__(self, key: str) -> torch.Tensor:
        name = self.files[key]
        if name not in self._readers:
            self._readers[name] = ShardReader(self.directory / name)
        return self._readers[name].view(key).clone()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


@dataclass
class CheckpointPlan:
    plan: FoldPlan
    report: FoldReport
    meta: dict  # the checkpoint's read_meta
    tapered_left: list[str]  # TaperNorms the plan does not fold (module paths, as in the plan)


def plan_checkpoint(path: str | os.PathLike, *, keep_keys: bool = False) -> CheckpointPlan:
    """The fold plan of a gate-zero checkpoint (or a run's latest), with its report and what stays.

    Kept tensors are written under their model name (a tied tensor under its first
    name, as ``transformers`` expects); ``keep_keys=True`` keeps the checkpoint's own
    keys instead (an in-place fold cannot rename).

    Reads only the scalars and vectors of the checkpoint; the weights stay on disk.
    """
    meta = _read_source(path)
    _refuse_folded(meta)
    ckpt = Path(meta["path"])
    if not meta["gate_zero"]:
        raise ValueError(f"checkpoint {ckpt} is not at gate 0 (gate {meta.get('gate')}); only g = 0 folds")
    files = checkpoint_files(ckpt)
    model = _meta_model(meta)
    hf = _is_hf(meta)
    prefix = _HF_PREFIX if hf else ""
    sources = _source_keys(model, set(files), _HF_PREFIX if meta.get("hf_directory") else "")
    aliases = _aliases(model)

    def canonical(name: str) -> str:  # a tied tensor is written under its first name (the embedding's)
        return aliases[prefix + name][0].removeprefix(prefix)

    missing = sorted(set(model.state_dict()) - set(sources))
    if missing:
        raise ValueError(f"checkpoint {ckpt}: weights missing for {missing[:8]}")
    vectors = _Vectors(ckpt, files)
    try:
        # Scalars (the gate, c, the taper flag) go into the meta model, so each TaperNorm takes its
        # g = 0 branch when traced; a 0-dim CPU tensor may meet meta tensors in one op, as a Python number.
        state = model.state_dict()
        scalars = {name: vectors(key) for name, key in sources.items() if state[name].dim() == 0}
        model.load_state_dict(scalars, strict=False, assign=True)
        model.eval()
        program = _export(model, hf)
        plan, report = plan_from_program(
            program,
            lambda name: vectors(sources[prefix + name]),
            source=lambda name: sources[prefix + name],
            target=(lambda name: sources[prefix + name]) if keep_keys else canonical,
            untie_shared=True,
        )
    finally:
        vectors.close()
    folded = {m.name for m in plan.maps}
    return CheckpointPlan(plan, report, meta, [name for name in _tapered_names(model) if name not in folded])


def _export(model: nn.Module, hf: bool) -> torch.export.ExportedProgram:
    """One static trace on token ids: the plan depends on which layers read which norm, not on shapes
    (a dynamic export with the KV cache, as deployment needs, costs several times more)."""
    ids = torch.zeros(2, 3, dtype=torch.long, device="meta")
    with torch.no_grad():
        if hf:
            from taperfx.models.hf_causal_lm import unwrap

            return torch.export.export(unwrap(model), (ids,), {"use_cache": False}, strict=False)
        return torch.export.export(model, (ids,), strict=False)


def _folded_record(plan: FoldPlan) -> dict:
    """What a loader must change in the stock architecture to take the folded weights."""
    return {
        "identity_norms": [m.name for m in plan.maps],
        # a folded copy of a weight the output also keeps unfolded (a tied head)
        "untied": sorted({w.target.removesuffix(".weight") for w in plan.weights if w.source in plan.keys}),
        "added_biases": sorted(b.target.removesuffix(".bias") for b in plan.biases if b.source is None),
    }


def _refuse_tapernorms_left(planned: CheckpointPlan) -> None:
    """A stock transformers class cannot hold a TaperNorm: every one must fold."""
    if planned.tapered_left:
        reasons = {s.name: s.reason for s in planned.report.skipped}
        listed = "; ".join(f"{name}: {reasons.get(name, 'not matched')}" for name in planned.tapered_left)
        raise ValueError(f"cannot write a stock transformers checkpoint: these would stay TaperNorms ({listed})")


def _hf_config(meta: dict, plan: FoldPlan) -> dict:
    from taperfx.hf.folded import ADDED_BIASES_KEY, IDENTITY_NORMS_KEY

    record = _folded_record(plan)
    config = dict(source_from_dict(meta["model"]).config)
    config[IDENTITY_NORMS_KEY] = record["identity_norms"]
    config[ADDED_BIASES_KEY] = record["added_biases"]
    if record["untied"]:
        config["tie_word_embeddings"] = False
    return config


def _run_config(meta: dict, plan: FoldPlan) -> dict:
    config = {k: v for k, v in meta.items() if k not in ("path", "tokenizer_path", FOLDED_KEY)}
    config[FOLDED_KEY] = _folded_record(plan)
    return config


def _output_config(meta: dict, plan: FoldPlan) -> dict:
    """``config.json`` of the folded checkpoint: transformers' own (with the fold's keys), or taperfx's."""
    return _hf_config(meta, plan) if _is_hf(meta) else _run_config(meta, plan)


def _side_files(meta: dict) -> list[Path]:
    """What else the folded directory carries: the run's tokenizer, or a transformers directory's other
    files (tokenizer, generation config), never its weights or config."""
    if "tokenizer_path" in meta:
        return [Path(meta["tokenizer_path"])]
    path = Path(meta["path"])
    skip = {CONFIG_FILE, INDEX_FILE, JOURNAL_DIR}
    return [p for p in sorted(path.iterdir()) if p.is_file() and p.name not in skip and p.suffix != ".safetensors"]


def _check(checks: list[SpotCheck]) -> None:
    bad = [c for c in checks if not c.ok]
    if bad:
        raise ValueError(
            "the folded weights do not match the original layers: "
            + "; ".join(f"{c.weight}: error {c.max_error:.3g} > rounding {c.tolerance:.3g}" for c in bad)
        )


def fold_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    in_place: bool = False,
    progress: bool = True,
) -> CheckpointFold:
    """Fold the gate-zero checkpoint ``path`` (or a run's latest) into ``out``, streaming its shards.

    ``out`` must not exist or be empty; it appears complete or not at all. With
    ``in_place=True`` (and no ``out``) the weights are rewritten inside the
    checkpoint's own shards under a crash-safe journal: a re-run after a crash
    completes the fold (see ``taperfx.passes.journal``).
    """
    if in_place == (out is not None):
        raise ValueError("give either an output directory or in_place=True, not both and not neither")
    if in_place:
        return _fold_in_place(path, progress)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists and is not an empty directory; choose a new directory for the folded checkpoint"
        )
    planned = plan_checkpoint(path)
    plan, report, meta = planned.plan, planned.report, planned.meta
    hf = _is_hf(meta)
    if hf:
        _refuse_tapernorms_left(planned)
    config = _output_config(meta, plan)
    source = Path(meta["path"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        stats = stream_fold(plan, source, tmp, progress=progress)
        checks = spot_check(plan, source, tmp)
        _check(checks)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for side in _side_files(meta):
            shutil.copyfile(side, tmp / side.name)
        try:
            if out.exists():
                out.rmdir()  # empty, as checked above
            tmp.rename(out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise WouldOverwrite(
                f"{out} was filled by another process while this fold ran; it is left as it is, choose a new directory",
                code="output-exists",
            ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointFold(out, report, stats, checks, hf, plan)


def _fold_in_place(path: str | os.PathLike, progress: bool) -> CheckpointFold:
    """Fold a checkpoint inside its own shards (``taperfx.passes.journal``), or finish one a crash cut.

    A taperfx run keeps its format (``config.json`` gains ``"folded"``); a transformers
    directory stays one (its config gains the keys ``load_folded`` reads). A taperfx
    run of a transformers model cannot: its folded form is a different directory.
    """
    ckpt = Path(path)
    config_file = ckpt / CONFIG_FILE
    resuming = has_journal(ckpt)
    if resuming:  # the config may already say "folded": the crash hit after it was written
        meta = read_json_object(config_file)
        meta = {"path": str(ckpt), "model": HFSource(ckpt, meta).to_dict()} if "model_type" in meta else meta
    else:
        meta = _read_source(path)
        ckpt = Path(meta["path"])
        config_file = ckpt / CONFIG_FILE
    if _is_hf(meta) and not meta.get("hf_directory", resuming):
        raise ValueError(
            f"checkpoint {ckpt} is a taperfx run of a transformers model: its folded form is a transformers "
            "directory, which an in-place fold cannot produce; give an output directory"
        )
    report, plan = FoldReport(), None
    if not resuming:
        _refuse_folded(meta)
        try:
            planned = plan_checkpoint(ckpt, keep_keys=True)
            if _is_hf(meta):
                _refuse_tapernorms_left(planned)
        except TaperfxError:  # a damaged or refused checkpoint: another output directory would not help
            raise
        except ValueError as exc:
            raise ValueError(f"checkpoint {ckpt} cannot be folded in place ({exc}); give an output directory") from exc
        plan, report = planned.plan, planned.report

    def finish(applied: FoldPlan) -> None:
        tmp = config_file.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(_output_config(meta, applied), indent=2) + "\n")
        os.replace(tmp, config_file)

    applied = stream_fold_in_place(plan, ckpt, finish=finish, progress=progress)
    folded = sum(ShardWriter.nbytes(*_shape(ckpt, w.source)) for w in applied.weights if w.target == w.source)
    return CheckpointFold(ckpt, report, StreamStats(folded_bytes=folded), [], _is_hf(meta), applied)


def _shape(ckpt: Path, key: str) -> tuple:
    files = checkpoint_files(ckpt)
    with ShardReader(ckpt / files[key]) as shard:
        info = shard.tensors[key]
    return info.dtype, info.shape


def load_folded_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The norm-free model of a folded taperfx checkpoint (reference decoders), in eval mode.

    Built as the checkpoint's architecture and protocol, then changed as its
    ``"folded"`` record says (folded norms become ``nn.Identity``, untied heads get
    their own weight, added biases a slot), then loaded strictly from the shards.
    """
    meta = read_meta(path)
    record = meta.get(FOLDED_KEY)
    if record is None:
        raise ValueError(f"checkpoint {meta['path']} is not folded (no {FOLDED_KEY!r} in {CONFIG_FILE})")
    if _is_hf(meta):
        raise ValueError(f"checkpoint {meta['path']} holds a transformers model; load it with taperfx.hf.load_folded")
    ckpt = Path(meta["path"])
    lists = ("identity_norms", "untied", "added_biases")
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), list) and all(isinstance(n, str) for n in record[k]) for k in lists
    ):
        raise DataError(f"checkpoint {ckpt}: {CONFIG_FILE}'s {FOLDED_KEY!r} record is damaged", code="bad-checkpoint")
    model = source_from_dict(meta["model"]).build_architecture()
    if meta["protocol"] != "baseline":
        convert(model, meta["protocol"])

    def module(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise DataError(
                f"checkpoint {ckpt}: its {FOLDED_KEY!r} record names {name!r}, which the model does not have",
                code="bad-checkpoint",
            ) from None

    for name in record["identity_norms"]:
        parent, _, child = name.rpartition(".")
        module(name)
        setattr(module(parent), child, nn.Identity())
    for name in record["untied"]:
        linear = module(name)
        linear.weight = nn.Parameter(torch.empty_like(linear.weight))
    for name in record["added_biases"]:
        linear = module(name)
        linear.bias = nn.Parameter(torch.empty(linear.weight.shape[0], dtype=linear.weight.dtype))
    state = _read_shards(ckpt)
    result = model.load_state_dict(state, strict=False)
    aliases = _aliases(model)
    missing = [k for k in result.missing_keys if not any(a in state for a in aliases[k])]
    if missing or result.unexpected_keys:
        raise DataError(
            f"checkpoint {ckpt}: weights do not fit the folded model: missing {missing}, "
            f"unexpected {result.unexpected_keys}",
            code="bad-checkpoint",
        )
    return model.to(device).eval()


def _read_shards(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's shards (a damaged or missing shard or index: ``shards`` raises
    ``DataError``, code ``bad-checkpoint``)."""
    files = checkpoint_files(ckpt)
    state = {}
    for name in sorted(set(files.values())):
        with ShardReader(ckpt / name) as reader:
            state.update({key: reader.view(key).clone() for key in reader.tensors if files.get(key) == name})
    return state


def load_inference_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """``(model, meta)`` of a taperfx checkpoint (or a run's latest), folded or not, in eval mode: what
    ``taperfx generate`` and ``taperfx eval`` run. A folded one (``taperfx fold CKPT -o DIR``) comes back
    norm-free (``load_folded_checkpoint``), any other as ``train.checkpoint.load_model`` rebuilds it."""
    meta = read_meta(path)
    if meta.get(FOLDED_KEY) is None:
        return load_model(path, device)
    return load_folded_checkpoint(meta["path"], device), meta
