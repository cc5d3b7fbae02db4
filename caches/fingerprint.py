"""Fingerprints of the models whose outputs the caches keep.

A cached answer is only valid for the model that wrote it. The served name is not enough: changing
``llm.model`` in the config, another dtype or context length, a re-quantised checkpoint all change
answers without anyone bumping a version. So every key carries a fingerprint of

- every small file of the model folder (config, generation config, tokenizer, chat template), whole;
- every weights file: its name, size and three 1 MiB windows (start, middle, end). Hashing all of a
  15 GB checkpoint at every replica start would cost minutes, so the rest of each file is not read;
- the engine settings that change outputs (dtype, context length, quantisation, ...), passed in.

What this detects: another model folder, added, removed or renamed files, a weights file of
another size (other shapes, another dtype or quantisation), any change to a small file, and any
change that touches a sampled window (a safetensors/GGUF header sits in the first one). What it
does NOT detect: weights replaced in place by others of the same names, sizes and tensor
layout whose changes all lie outside the three windows - typically a fine-tune of the same
base model (a merged LoRA that touches a few layers, above all) copied over the old files under
the same name. A model given as a hub id rather than a folder is fingerprinted by its id,
revision and the model config (``config.json``) the engine loaded, not by its files: new weights,
tokenizer or chat template pushed to the same revision (``main`` when none is pinned) are not
detected either. (The engine's default sampling, read from the generation config, is in every key
on its own: :class:`caches.chat.ModelIdentity`.) Whoever replaces weights in place must bump the
model's version (``tierserve bump-version``, or ``POST /admin/models/{name}/version``), which
makes every old entry unreachable.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".onnx", ".npz", ".h5")
WINDOW_BYTES = 1 << 20  # per sampled window of a weights file
SMALL_FILE_BYTES = 8 << 20  # files up to this size (configs, tokenizers) are hashed whole


def fingerprint_folder(folder: Path, extra: dict[str, Any] | None = None) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:  # lock files, caches of tools
            continue
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= SMALL_FILE_BYTES and not rel.endswith(WEIGHT_SUFFIXES):
                h.update(f.read())
                continue
            for offset in (0, max(0, size // 2 - WINDOW_BYTES // 2), max(0, size - WINDOW_BYTES)):
                f.seek(offset)
                h.update(f.read(WINDOW_BYTES))
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fingerprint_model(model: str, extra: dict[str, Any] | None = None, loaded_config: str = "") -> str:
    """A folder's :func:`fingerprint_folder`; for a hub id, its id and the config it loaded as."""
    folder = Path(model)
    if folder.is_dir():
        return fingerprint_folder(folder, extra)
    h = hashlib.sha256(f"hub\0{model}\0{loaded_config}".encode())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()
