"""Sparse reads and writes of the UNet's cross-attention K/V weights ("neurons").

Indices are flat positions into a tensor's row-major storage (int64, sorted, unique), as in
cones_store.records. Every write saves what it overwrote, so undoing it is bit-exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cns_daemon.api.errors import ModelMismatch
from cns_daemon.model import kv_weights

__all__ = ["kv_weights", "SavedValues", "write_values", "restore_values", "read_values",
           "mask_indices", "union_indices", "count", "kv_total", "TrainableValues"]


def _idx(indices, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices, dtype=np.int64)).to(device)


def read_values(param: torch.Tensor, indices) -> torch.Tensor:
    return param.detach().reshape(-1)[_idx(indices, param.device)].clone()


@dataclass
class SavedValues:
    """Values some writes replaced: tensor name → (indices, old values)."""
    params: dict[str, torch.nn.Parameter]
    old: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def check_positions(params: dict[str, torch.nn.Parameter], positions: dict[str, np.ndarray]) -> None:
    """ModelMismatch unless every named tensor is one of `params` and holds every position."""
    for name, indices in positions.items():
        if name not in params:
            raise ModelMismatch(f"The model has no K/V tensor {name!r}.")
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= params[name].numel()):
            raise ModelMismatch(f"Positions up to {int(idx.max())} are out of range for {name} "
                                f"({params[name].numel()} values).")


def write_values(params: dict[str, torch.nn.Parameter],
                 updates: dict[str, tuple[np.ndarray, np.ndarray | torch.Tensor | float]]) -> SavedValues:
    """Write `values` (an array, or one scalar such as 0.0) at `indices` of each named tensor.
    All or nothing: every name and position is checked before the first write (a Cones mask
    carries no shape the store could check it by, and a write failing half-way left the live
    model with some of its neurons shut until a restart)."""
    check_positions(params, {name: indices for name, (indices, _) in updates.items()})
    saved = SavedValues(params)
    with torch.no_grad():
        for name, (indices, values) in updates.items():
            p = params[name]
            idx = _idx(indices, p.device)
            flat = p.data.view(-1)
            saved.old[name] = (idx, flat[idx].clone())
            flat[idx] = torch.as_tensor(values).to(p.device, p.dtype)
    return saved


def restore_values(saved: SavedValues) -> None:
    with torch.no_grad():
        for name, (idx, old) in saved.old.items():
            saved.params[name].data.view(-1)[idx] = old


@dataclass
class TrainableValues:
    """Some values of one K/V tensor as a flat trainable parameter (what CNS and Cones train).
    The loss sees them through the weight: `write` puts them in, the weight's gradient is sliced
    back onto them (`take_grad`), `restore` puts back what the weight held at the start."""
    weight: torch.nn.Parameter
    idx: torch.Tensor
    values: torch.nn.Parameter
    prev: torch.Tensor         # the weight's values there at the start, float32

    @classmethod
    def at(cls, weight: torch.nn.Parameter, indices, start: torch.Tensor | None = None, **extra):
        """Trainable values at `indices`, starting from what the weight holds or from `start`;
        `extra` fills a subclass's own fields."""
        idx = _idx(indices, weight.device)
        prev = weight.detach().view(-1)[idx].clone().float()
        first = prev.clone() if start is None else start.to(prev.device, torch.float32)
        return cls(weight, idx, torch.nn.Parameter(first), prev, **extra)

    def write(self) -> None:
        with torch.no_grad():
            self.weight.data.view(-1)[self.idx] = self.values.detach().to(self.weight.dtype)

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.data.view(-1)[self.idx] = self.prev.to(self.weight.dtype)

    def take_grad(self) -> None:
        """Add the weight's gradient at our positions to ours: the denoising loss reaches the
        whole weight, and only the selected values train."""
        mine = self.weight.grad.view(-1)[self.idx].float()
        self.values.grad = mine if self.values.grad is None else self.values.grad + mine


def mask_indices(mask: torch.Tensor) -> np.ndarray:
    """A boolean tensor → its sorted flat true positions."""
    return torch.nonzero(mask.reshape(-1), as_tuple=False).reshape(-1).cpu().numpy().astype(np.int64)


def union_indices(index_sets: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for sets in index_sets:
        for name, idx in sets.items():
            out[name] = np.union1d(out[name], idx) if name in out else np.asarray(idx, np.int64)
    return out


def count(index_sets: dict[str, np.ndarray]) -> int:
    return int(sum(len(v) for v in index_sets.values()))


def kv_total(unet) -> int:
    return int(sum(p.numel() for p in kv_weights(unet).values()))
