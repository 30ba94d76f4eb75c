"""What one edit changes in one layer's W_out: low-rank, dense or sparse, behind one small protocol.

Every update knows its dense form (``dense()``, d_model x d_ff float32), the keys its solve used (``keys``,
d_ff x n, or None), its response to other keys (``response(k) = Delta k``) and a compact serialization
(``tensors()`` / :func:`update_from_tensors`), so the ledger, the edits file, diagnostics, undo and
``apply_edits`` never ask which kind a method produced. Locate-then-edit methods produce ``LowRankUpdate``
(``Delta = left right^T``: influence vectors times activation vectors), FT a ``DenseUpdate``, RECT's
sparsification a ``SparseUpdate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class Update:
    """Base of the update kinds; ``keys`` are the inputs the update was solved for (None when there are none)."""

    kind: ClassVar[str] = "update"
    # the tensors as large as the layer itself (FT's dense change, RECT's kept entries): an Editor with a
    # ledger holds them in the edit's file, mapped, rather than in memory (``backed_by``)
    layer_sized: ClassVar[tuple[str, ...]] = ()

    def backed_by(self, stored: Mapping[str, torch.Tensor]) -> None:
        """Use ``stored``, equal copies of this update's layer-sized tensors (e.g. mapped from its ledger file),
        in their place: only where device, dtype, shape and strides are the same, and in place, so the update
        keeps its identity. Every result keeps its bits: the writes and sums are elementwise, and products take a
        fresh copy (a mapped tensor need not be aligned as allocated memory is, and matmul rounds by alignment)."""
        for name in self.layer_sized:
            current, copy = getattr(self, name), stored[name]
            if _layout(current) == _layout(copy):
                setattr(self, name, copy)

    def dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def response(self, keys: torch.Tensor) -> torch.Tensor:
        """``Delta @ keys`` (d_model x n)."""
        return self.dense(keys.device) @ keys

    def tensors(self) -> dict[str, torch.Tensor]:
        """The update's own tensors, by name, as stored (the reader rebuilds it with update_from_tensors)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Update:
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        return None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(d_model, d_ff): the shape of ``dense()``, without building it."""
        raise NotImplementedError


@dataclass
class LowRankUpdate(Update):
    """``Delta = left @ right.T``: ``left`` (d_model x r) the influence vectors, ``right`` (d_ff x r) the
    activation vectors, ``keys`` (d_ff x n) the keys the solve used."""

    left: torch.Tensor
    right: torch.Tensor
    keys: torch.Tensor | None = None
    kind: ClassVar[str] = "lowrank"

    def dense(self, device=None) -> torch.Tensor:
        device = self.left.device if device is None else device
        return self.left.to(device) @ self.right.to(device).T

    def response(self, keys: torch.Tensor) -> torch.Tensor:
        return self.left.to(keys.device) @ (self.right.to(keys.device).T @ keys)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"left": self.left, "right": self.right}
        return out if self.keys is None else {**out, "keys": self.keys}

    def to(self, device) -> LowRankUpdate:
        keys = None if self.keys is None else self.keys.to(device)
        return LowRankUpdate(self.left.to(device), self.right.to(device), keys)

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return int(self.left.shape[0]), int(self.right.shape[0])


@dataclass
class DenseUpdate(Update):
    """A full d_model x d_ff change (FT)."""

    delta: torch.Tensor
    keys: torch.Tensor | None = None
    kind: ClassVar[str] = "dense"
    layer_sized: ClassVar[tuple[str, ...]] = ("delta",)

    def dense(self, device=None) -> torch.Tensor:
        return self.delta.float() if device is None else self.delta.to(device).float()

    def response(self, keys: torch.Tensor) -> torch.Tensor:
        return self.delta.to(keys.device, torch.float32, copy=True) @ keys  # a fresh, aligned copy (backed_by)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta} if self.keys is None else {"delta": self.delta, "keys": self.keys}

    def to(self, device) -> DenseUpdate:
        return DenseUpdate(self.delta.to(device), None if self.keys is None else self.keys.to(device))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return tuple(self.delta.shape)  # a malformed delta's own shape, whatever its length


@dataclass
class SparseUpdate(Update):
    """The entries ``values`` where ``mask`` is set in a ``shape`` matrix, zero elsewhere (RECT).

    The mask is kept as packed bits (one bit per entry, row-major): RECT keeps a fifth of the entries, so flat
    int64 positions would cost 12 bytes per kept entry against 4.6 here, in memory and in the ledger alike.
    """

    mask: torch.Tensor  # uint8, ceil(rows * cols / 8) bytes, most significant bit first
    values: torch.Tensor  # float32, the kept entries in row-major order
    shape: tuple[int, int]
    keys: torch.Tensor | None = None
    kind: ClassVar[str] = "sparse"
    layer_sized: ClassVar[tuple[str, ...]] = ("mask", "values")

    @classmethod
    def keep(cls, delta: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor | None = None) -> SparseUpdate:
        """The entries of ``delta`` where ``mask`` is true."""
        flat = mask.reshape(-1).bool()
        return cls(pack_bits(flat), delta.reshape(-1)[flat].float().contiguous(), tuple(delta.shape), keys)

    @classmethod
    def at(
        cls, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], keys: torch.Tensor | None = None
    ) -> SparseUpdate:
        """From flat row-major positions (any order, each once) and their values."""
        indices, order = indices.long().sort()
        if indices.numel() and (indices[0] < 0 or indices[-1] >= shape[0] * shape[1]):
            raise ValueError(f"sparse positions must lie in [0, {shape[0] * shape[1]}) for shape {tuple(shape)}")
        if bool((indices[1:] == indices[:-1]).any()):
            raise ValueError("sparse positions must not repeat")
        flat = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=indices.device)
        flat[indices] = True
        return cls(pack_bits(flat), values[order].float(), tuple(shape), keys)

    @property
    def indices(self) -> torch.Tensor:
        """The kept entries' flat row-major positions (int64, increasing)."""
        return self._flat_mask().nonzero().squeeze(1)

    def _flat_mask(self, device=None) -> torch.Tensor:
        mask = self.mask if device is None else self.mask.to(device)
        return unpack_bits(mask, self.shape[0] * self.shape[1])

    def dense(self, device=None) -> torch.Tensor:
        device = self.values.device if device is None else device
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.float32, device=device)
        out[self._flat_mask(device)] = self.values.to(device)
        return out.reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"mask": self.mask, "values": self.values, "shape": torch.tensor(self.shape, dtype=torch.int64)}
        return out if self.keys is None else {**out, "keys": self.keys}

    def to(self, device) -> SparseUpdate:
        keys = None if self.keys is None else self.keys.to(device)
        return SparseUpdate(self.mask.to(device), self.values.to(device), self.shape, keys)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return tuple(self.shape)


def _layout(tensor: torch.Tensor) -> tuple:
    return tensor.device, tensor.dtype, tensor.shape, tensor.stride()


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def packed_bytes(count: int) -> int:
    """How many bytes :func:`pack_bits` makes of ``count`` entries."""
    return (count + 7) // 8


def pack_bits(flat: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, eight entries a byte, most significant bit first (numpy's packbits)."""
    padded = torch.zeros(packed_bytes(flat.numel()) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (padded.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` entries of :func:`pack_bits`'s bytes, as a flat bool tensor."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return (packed.reshape(-1, 1) & weights).ne(0).reshape(-1)[:count]


KINDS: dict[str, type[Update]] = {cls.kind: cls for cls in (LowRankUpdate, DenseUpdate, SparseUpdate)}


def update_from_tensors(kind: str, tensors: dict[str, torch.Tensor]) -> Update:
    """Rebuild an update from :meth:`Update.tensors` (ValueError naming what is missing or unknown)."""
    if kind not in KINDS:
        raise ValueError(f"unknown update kind {kind!r}; known: {sorted(KINDS)}")
    keys = tensors.get("keys")
    try:
        if kind == "lowrank":
            return LowRankUpdate(tensors["left"], tensors["right"], keys)
        if kind == "dense":
            return DenseUpdate(tensors["delta"], keys)
        shape = tuple(int(x) for x in tensors["shape"].tolist())
        if len(shape) != 2:
            raise ValueError(f"a sparse update's shape has two entries, got {list(shape)}")
        values = tensors["values"]
        if values.dim() != 1:
            raise ValueError(f"a sparse update's values must be one-dimensional, got shape {tuple(values.shape)}")
        if "indices" in tensors and "mask" not in tensors:  # format version 2 stored int64 positions
            if tensors["indices"].shape != values.shape:
                raise ValueError("a sparse update needs one position per value")
            return SparseUpdate.at(tensors["indices"], values, shape, keys)
        mask, entries = tensors["mask"], shape[0] * shape[1]
        if mask.dtype != torch.uint8 or mask.numel() != packed_bytes(entries):
            raise ValueError(f"a sparse mask of a {shape} matrix is {packed_bytes(entries)} uint8 bytes")
        if int(unpack_bits(mask, entries).sum()) != values.numel():
            raise ValueError("a sparse update needs one value per set bit of its mask")
        return SparseUpdate(mask, values, shape, keys)
    except KeyError as missing:
        raise ValueError(f"a {kind} update needs the tensor {missing}") from None


def summed(base: torch.Tensor, updates: list[Update]) -> torch.Tensor:
    """``base`` (float32 copy) plus each update's dense form, added in order on ``base``'s device: the plain
    composition of a layer's weight, the same bits whether computed at once or one edit after another."""
    total = base.float().clone()
    for update in updates:
        total += update.dense(total.device)
    return total
