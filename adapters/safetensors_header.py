"""Read a safetensors header without loading tensors or executing anything.

Format: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON
`{tensor_name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw data. We read only the header, bound its size, and check that every entry is
well-formed and lies inside the file, so a corrupt or hostile file yields a clear message.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# Real headers are a few KB to a few MB; safetensors itself caps them at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}


class HeaderError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Return {tensor name: TensorInfo} from the header of `path`; HeaderError if malformed."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise HeaderError(f"file is {size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > max_header_bytes or 8 + n > size:
            raise HeaderError(
                f"header length field says {n} bytes but the file has {size - 8} bytes after it "
                f"(limit {max_header_bytes}); the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise HeaderError("header JSON is not an object")

    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise HeaderError(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise HeaderError(f"tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise HeaderError(f"tensor {name!r} has data_offsets {offsets!r} outside the file")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise HeaderError(
                f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but "
                f"data_offsets span {offsets[1] - offsets[0]}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), nbytes)
    return tensors
