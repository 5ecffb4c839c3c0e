"""A minimal GGUF reader: metadata, tensor directory, and raw tensor bytes.

Why not `gguf.GGUFReader`: it builds a numpy view per array element, which for SmolLM2's 49K-token
vocabulary and 49K merges takes ~3.3 s on this CPU, longer than the whole load budget. This reader
walks the same format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) with plain
`struct` calls (~0.1 s) and still uses the `gguf` package for the type tables and for dequantizing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF's dims reversed
    quant_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    num_bytes: int

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


class GgufFile:
    """The parsed header of one GGUF file. Tensor bytes are read on demand from a memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buffer = memoryview(self._data)
        self._position = 0
        if bytes(self._buffer[:4]) != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        self._position = 4
        self.version = self._scalar("<I")
        if self.version < 2:
            raise ValueError(f"{self.path}: GGUF version {self.version} is not supported (need >= 2)")
        num_tensors = self._scalar("<Q")
        num_metadata = self._scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_metadata):
            key = self._string()
            self.metadata[key] = self._value(GGUFValueType(self._scalar("<I")))
        entries = [self._tensor_entry() for _ in range(num_tensors)]
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._position // alignment) * alignment
        self.tensors: dict[str, GgufTensorInfo] = {}
        for name, shape, quant_type, relative_offset in entries:
            block_size, type_size = GGML_QUANT_SIZES[quant_type]
            num_elements = int(np.prod(shape)) if shape else 1
            self.tensors[name] = GgufTensorInfo(
                name=name, shape=shape, quant_type=quant_type, offset=data_start + relative_offset,
                num_bytes=num_elements // block_size * type_size,
            )

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 array (no copy)."""
        info = self.tensors[name]
        return self._data[info.offset: info.offset + info.num_bytes]

    # --- parsing -------------------------------------------------------------------------------

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buffer, self._position)
        self._position += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._buffer, self._position)
        start = self._position + 8
        self._position = start + length
        return bytes(self._buffer[start: self._position]).decode("utf-8", errors="replace")

    def _value(self, value_type: GGUFValueType) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._string()
        if value_type != GGUFValueType.ARRAY:
            return self._scalar(_SCALAR_FORMATS[value_type])
        item_type = GGUFValueType(self._scalar("<I"))
        count = self._scalar("<Q")
        if item_type in _NUMPY_DTYPES:
            dtype = np.dtype(_NUMPY_DTYPES[item_type])
            start = self._position
            self._position += count * dtype.itemsize
            return np.frombuffer(self._buffer[start: self._position], dtype=dtype).tolist()
        if item_type == GGUFValueType.STRING:
            return self._string_array(count)
        return [self._value(item_type) for _ in range(count)]

    def _string_array(self, count: int) -> list[str]:
        # The hot loop of the header (vocabulary + merges): keep it to slicing and one decode.
        buffer, position, unpack = self._buffer, self._position, struct.Struct("<Q").unpack_from
        strings = []
        append = strings.append
        for _ in range(count):
            (length,) = unpack(buffer, position)
            position += 8
            append(bytes(buffer[position: position + length]).decode("utf-8", errors="replace"))
            position += length
        self._position = position
        return strings

    def _tensor_entry(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._string()
        num_dims = self._scalar("<I")
        dims = struct.unpack_from(f"<{num_dims}Q", self._buffer, self._position)
        self._position += 8 * num_dims
        quant_type = GGMLQuantizationType(self._scalar("<I"))
        offset = self._scalar("<Q")
        return name, tuple(int(d) for d in reversed(dims)), quant_type, offset
