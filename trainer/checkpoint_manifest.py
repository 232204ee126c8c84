"""A checkpoint's manifest: each file's size and crc32, per tensor for safetensors files, and the checks.

Written at save time (the tensors' checksums from memory, so the big files are not read back) and checked
before a resume: a file of another size, a tensor whose bytes or place in the file changed, or a small file
whose bytes changed is named with what differs. crc32 catches damage (a truncated copy, bytes overwritten),
not tampering; safetensors' no-code loading is what guards against that.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import BinaryIO

import torch

_READ_CHUNK = 16 * 2**20


def file_entry(file: Path) -> dict:
    """The manifest entry of a small file: its size and the crc32 of its bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        return {"bytes": size, "crc32": _crc32_of(handle, size)}


def tensors_entry(file: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """The manifest entry of a safetensors file just written from `tensors`: its size and each tensor's."""
    return {"bytes": file.stat().st_size, "tensors": {name: _tensor_entry(t) for name, t in tensors.items()}}


def _tensor_entry(tensor: torch.Tensor) -> dict:
    """Shape, byte count and crc32 of a tensor's bytes, as safetensors lays them out (little-endian, contiguous)."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return {"shape": list(tensor.shape), "nbytes": data.numel(), "crc32": zlib.crc32(data.numpy())}


def entry_problem(file: Path, entry: dict) -> str | None:
    """How `file` differs from its manifest entry (presence, size, then checksums), or None."""
    if not file.is_file():
        return f"{file}: missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        how = "truncated" if size < entry["bytes"] else "grown"
        return f"{file}: {size} bytes, {entry['bytes']} when saved ({how})"
    if "tensors" in entry:
        return _tensors_problem(file, size, entry["tensors"])
    with open(file, "rb") as handle:
        crc = _crc32_of(handle, size)
    if crc != entry["crc32"]:
        return f"{file}: checksum mismatch (crc32 {crc:08x}, {entry['crc32']:08x} when saved)"
    return None


def _tensors_problem(file: Path, size: int, tensors: dict[str, dict]) -> str | None:
    """The first tensor of a safetensors file whose place, shape or bytes differ from the manifest, or None."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(header_len)) if header_len <= size else None
        except ValueError:  # UnicodeDecodeError included
            header = None
        if not isinstance(header, dict):
            return f"{file}: checksum mismatch (unreadable safetensors header)"
        for name, saved in tensors.items():
            info = header.get(name)
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if not isinstance(info, dict) or info.get("shape") != saved["shape"] or not _is_range(offsets):
                return f"{file}: checksum mismatch (tensor {name!r} is not in the header as saved)"
            begin, end = offsets
            handle.seek(8 + header_len + begin)
            crc = _crc32_of(handle, end - begin)
            if end - begin != saved["nbytes"] or crc != saved["crc32"]:
                return (f"{file}: checksum mismatch in tensor {name!r} (crc32 {crc:08x}, {saved['crc32']:08x} "
                        "when saved): the file changed after it was written")
    return None


def _is_range(offsets: object) -> bool:
    return isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets)


def _crc32_of(handle: BinaryIO, size: int) -> int:
    """crc32 of the next `size` bytes of an open file, read in chunks."""
    crc = 0
    while size > 0:
        chunk = handle.read(min(size, _READ_CHUNK))
        if not chunk:
            break
        crc, size = zlib.crc32(chunk, crc), size - len(chunk)
    return crc


