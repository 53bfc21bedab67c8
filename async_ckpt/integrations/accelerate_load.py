"""The load side of :class:`.accelerate.AcceleratorCheckpointer`: the state a load of an
Accelerator fills in, asking only for what the checkpoint holds, and what is set
from it once loaded (step, dataloaders, generators, iteration).

The checkpointer picks the checkpoint, runs the load and logs it; nothing here
touches the checkpointer.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator

from ..errors import KeyMismatchError
from ..format.decode import decode_metadata
from ..format.metadata import Metadata
from ..storage.detect import detect_reader
from . import accelerate_rng
from .accelerate_layout import (
    RNG,
    AsStored,
    children,
    dataloader_state,
    indices,
    set_dataloader_state,
    stored_keys,
)

log = logging.getLogger("async_ckpt")


def prepare_load(
    accelerator: Accelerator, checkpoint_id: str
) -> tuple[dict[str, Any], Metadata | None]:
    """Run the load pre-hooks; return the state to load into and the checkpoint's
    metadata (None where it could not be read)."""
    acc = accelerator
    models = list(acc._models)
    for hook in acc._load_model_state_pre_hook.values():
        hook(models, checkpoint_id)
    try:
        meta: Metadata | None = decode_metadata(detect_reader(checkpoint_id).read_metadata())
    except Exception:
        meta = None  # the load below meets the same error, on every rank together
    state: dict[str, Any] = {
        "models": {i: acc.unwrap_model(model) for i, model in enumerate(models)},
        "optimizers": dict(enumerate(acc._optimizers)),
        "schedulers": dict(enumerate(acc._schedulers)),
        "dataloaders": {},
        "custom": dict(enumerate(acc._custom_objects)),
        "step": acc.step,
        "iteration": acc.save_iteration,
    }
    if acc.scaler is not None:
        state["scaler"] = acc.scaler
    rng_key = f"{RNG}.rank{acc.process_index}"
    if meta is not None:
        _check_custom(acc, meta, checkpoint_id)
        stored = stored_keys(meta)  # what the checkpoint holds, prefixes included
        for part in ("optimizers", "schedulers", "custom"):  # the checkpoint decides
            state[part] = {
                i: AsStored(obj, f"{part}.{i}", stored) for i, obj in state[part].items()
            }
        if "scaler" in state:
            state["scaler"] = AsStored(state["scaler"], "scaler", stored)
        for i, dl in enumerate(acc._dataloaders):
            parts = dataloader_state(dl)
            state["dataloaders"][i] = {
                k: v for k, v in parts.items() if f"dataloaders.{i}.{k}" in stored
            }
        if rng_key in stored:
            state[RNG] = {
                f"rank{acc.process_index}": accelerate_rng.template(
                    lambda part: f"{rng_key}.{part}" in stored
                )
            }
        else:
            log.warning(
                "%s holds no generator states for process %d (saved by %d processes); "
                "this process's generators are left as they are",
                checkpoint_id,
                acc.process_index,
                len(children(meta, RNG)),
            )
    return state, meta


def finish_load(accelerator: Accelerator, state: dict[str, Any], auto: bool) -> None:
    """Set what the loaded ``state`` holds that is not restored in place; with automatic
    naming (``auto``), the next save's iteration follows the loaded one."""
    acc = accelerator
    acc.step = int(state["step"])
    for i, dl in enumerate(acc._dataloaders):
        set_dataloader_state(dl, state["dataloaders"].get(i, {}))
    if RNG in state:
        accelerate_rng.restore(state[RNG][f"rank{acc.process_index}"])
    if auto:
        acc.project_configuration.iteration = int(state["iteration"]) + 1


def _check_custom(accelerator: Accelerator, meta: Metadata, checkpoint_id: str) -> None:
    """As accelerate: the registered objects must match the checkpoint's in number."""
    stored = indices(meta, "custom")
    registered = len(accelerator._custom_objects)
    if stored != set(range(registered)):
        raise KeyMismatchError(
            f"{checkpoint_id!r} holds {len(stored)} custom object(s) and "
            f"{registered} are registered with register_for_checkpointing; load only "
            "checkpoints saved with the same registered objects",
            missing=[f"custom.{i}" for i in range(registered) if i not in stored],
            unexpected=[f"custom.{i}" for i in sorted(stored) if i >= registered],
        )
