"""Hugging Face checkpoint folders: config.json and ``*.safetensors`` (single or sharded), never pickles."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def read_config(folder: str | Path) -> dict:
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        raise ValueError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return json.loads(config_file.read_text())


def read_eos_token_ids(folder: str | Path) -> set[int]:
    """Every end-of-sequence id the checkpoint names: config.json (and its text_config) and
    generation_config.json, each an id or a list of ids."""
    folder = Path(folder)
    config = read_config(folder)
    sources = [config, config.get("text_config") or {}]
    generation = folder / "generation_config.json"
    if generation.is_file():
        sources.append(json.loads(generation.read_text()))
    ids: set[int] = set()
    for source in sources:
        eos = source.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).exists()]
        if missing:
            raise ValueError(f"{index} names shard(s) that are not in the folder: {missing}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(ext))
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle checkpoints ({', '.join(pickles)}); fusionserve refuses them because "
            "loading a pickle can run arbitrary code. Convert to safetensors (e.g. transformers' "
            "save_pretrained(..., safe_serialization=True)) and try again.")
    raise ValueError(f"no *.safetensors weights in {folder}")


def load_weights(model: nn.Module, folder: str | Path, rename: Callable[[str], str | None], what: str,
                 device: torch.device | str, dtype: torch.dtype, skip: set[str] = frozenset(),
                 stacked: dict[str, tuple[str, ...]] | None = None) -> None:
    """Loads every tensor of the folder into ``model`` (built on the meta device), cast to ``dtype``.
    ``rename`` maps a checkpoint name to a parameter name, or None for a tensor to ignore; ``skip``: parameters
    the checkpoint need not hold (tied weights); ``stacked``: fused modules and the checkpoint modules they stack
    along dim 0, in order (``{"qkv_proj": ("q_proj", "k_proj", "v_proj")}``: ``a.q_proj.weight`` goes into
    ``a.qkv_proj.weight`` where the model has that parameter, the parts it holds concatenated in that order).
    Unexpected, missing or misshapen tensors are ValueErrors."""
    folder = Path(folder)
    expected = {name: p for name, p in model.named_parameters() if name not in skip}
    stacked = stacked or {}
    into = {part: (fused, i) for fused, parts in stacked.items() for i, part in enumerate(parts)}
    loaded: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, tuple[str, torch.Tensor]]] = {}  # stacked parameter: its parts by index
    for file in checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for raw in f.keys():
                name = rename(raw)
                if name is None or name in skip:
                    continue
                module, _, leaf = name.rpartition(".")
                parent, _, child = module.rpartition(".")
                fused = ".".join(filter(None, (parent, into[child][0], leaf))) if child in into else None
                if fused in expected:  # a part of a stacked parameter
                    pieces.setdefault(fused, {})[into[child][1]] = (raw, f.get_tensor(raw))
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor {raw!r} in {file.name}: no such parameter in {what}")
                tensor = f.get_tensor(raw)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"tensor {raw!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected[name].shape)} from config.json")
                loaded[name] = tensor.to(device=device, dtype=dtype)
    for fused, parts in pieces.items():
        names = [raw for _, (raw, _) in sorted(parts.items())]
        tensor = torch.cat([t for _, (_, t) in sorted(parts.items())])
        if tuple(tensor.shape) != tuple(expected[fused].shape):
            raise ValueError(f"tensors {names} stack to shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[fused].shape)} for {fused} from config.json (is one missing?)")
        loaded[fused] = tensor.to(device=device, dtype=dtype)

    def described(name: str) -> str:  # a stacked parameter: with the checkpoint modules it is made of
        module = name.split(".")[-2] if "." in name else ""
        return f"{name} (stacked from {'/'.join(stacked[module])})" if module in stacked else name

    missing = [described(name) for name in sorted(set(expected) - set(loaded))]
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing tensor(s): {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    model.load_state_dict(loaded, strict=False, assign=True)
