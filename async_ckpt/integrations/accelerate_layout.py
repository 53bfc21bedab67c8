"""Where each part of an Accelerator's state sits in an async_ckpt checkpoint, and how
a load asks for exactly what a checkpoint holds.

The keys (see :mod:`.accelerate`): ``models.<i>``, ``optimizers.<i>``,
``schedulers.<i>``, ``scaler``, ``dataloaders.<i>``, ``custom.<i>``,
``rng.rank<r>``, ``step`` and ``iteration``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..format.metadata import Metadata

RNG = "rng"
"""The part holding each process's generators, under ``rank<r>``."""

_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed saves its engine with its own checkpoint files",
    DistributedType.FSDP: "FSDP's sharded state goes through its own state-dict APIs",
    DistributedType.MEGATRON_LM: "Megatron-LM saves through its own checkpoint functions",
    DistributedType.XLA: "XLA tensors and generators are not supported by async_ckpt",
}


def check_supported(accelerator: Accelerator) -> None:
    why = _UNSUPPORTED.get(accelerator.distributed_type)
    if why is not None:
        raise NotImplementedError(
            f"async_ckpt's accelerate integration does not handle "
            f"distributed_type={accelerator.distributed_type.value}: {why}. Use "
            "accelerator.save_state()/load_state() for this set-up."
        )


def stored_keys(meta: Metadata) -> set[str]:
    """Every key of the checkpoint and every dotted prefix of one."""
    found = set()
    for key in (*meta.entries, *meta.containers):
        parts = key.split(".")
        found.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return found


def _prune(value: Any, key: str, stored: set[str]) -> Any:
    """``value`` without the dict entries the checkpoint does not hold under ``key``."""
    if isinstance(value, Mapping):
        return {
            k: _prune(v, f"{key}.{k}", stored) for k, v in value.items() if f"{key}.{k}" in stored
        }
    if isinstance(value, list):
        return [_prune(v, f"{key}.{i}", stored) for i, v in enumerate(value)]
    return value


class AsStored:
    """A Stateful object whose load target holds only what the checkpoint holds.

    ``load_state_dict`` then gets exactly the checkpoint's state, as
    accelerate's ``obj.load_state_dict(torch.load(...))`` does: an optimizer
    that has moments for parameters the checkpoint has none for (saved before
    the first optimizer step) drops them instead of failing the load.
    """

    def __init__(self, obj: Any, key: str, stored: set[str]) -> None:
        self.obj, self.key, self.stored = obj, key, stored

    def state_dict(self) -> Any:
        return _prune(self.obj.state_dict(), self.key, self.stored)

    def load_state_dict(self, state: Any) -> None:
        self.obj.load_state_dict(state)


def children(meta: Metadata, part: str) -> set[str]:
    """The names ``x`` of the ``<part>.<x>`` the checkpoint holds."""
    found = set()
    for key in (*meta.entries, *meta.containers):
        head, _, rest = key.partition(".")
        if head == part and rest:
            found.add(rest.split(".", 1)[0])
    return found


def indices(meta: Metadata, part: str) -> set[int]:
    """The indices ``i`` of the ``<part>.<i>`` the checkpoint holds."""
    return {int(name) for name in children(meta, part) if name.isdigit()}


def _seedable_sampler(dataloader: Any) -> Any:
    from accelerate.data_loader import SeedableRandomSampler

    get = getattr(dataloader, "get_sampler", None)
    sampler = get() if callable(get) else None
    return sampler if isinstance(sampler, SeedableRandomSampler) else None


def dataloader_state(dataloader: Any) -> dict[str, Any]:
    """What of a prepared dataloader a resume needs: its epoch counter (``iteration``),
    its ``SeedableRandomSampler``'s epoch and seed, and a StatefulDataLoader's state."""
    state: dict[str, Any] = {}
    if isinstance(getattr(dataloader, "iteration", None), int):
        state["iteration"] = dataloader.iteration
    sampler = _seedable_sampler(dataloader)
    if sampler is not None:
        state["sampler"] = {"epoch": int(sampler.epoch), "initial_seed": int(sampler.initial_seed)}
    if getattr(dataloader, "use_stateful_dataloader", False):
        state["state"] = dataloader  # Stateful: state_dict() / load_state_dict()
    return state


def set_dataloader_state(dataloader: Any, state: dict[str, Any]) -> None:
    if "iteration" in state:
        dataloader.iteration = int(state["iteration"])
    sampler = _seedable_sampler(dataloader)
    if sampler is not None and "sampler" in state:
        sampler.epoch = int(state["sampler"]["epoch"])
        sampler.initial_seed = int(state["sampler"]["initial_seed"])
