"""Whether a load's keys may go ahead: DCP's rule, the exact rule, or none.

Pure: works on the :class:`~async_ckpt.planning.read_plan.KeyMatch` of a load
and says, when it refuses, what a user can do, including a wrapper module
(DDP, torch.compile) that renamed every key.
"""

from __future__ import annotations

from typing import Literal

from ..errors import KeyMismatchError
from .read_plan import KeyMatch

KeyCheck = bool | Literal["exact"]
"""How a load checks keys: True (the state dict's keys must all be stored, as in
DCP), "exact" (and nothing else may be stored), False (load what matches)."""


def check_keys(keys: KeyMatch, strict: KeyCheck, checkpoint_id: str) -> None:
    """Raise KeyMismatchError if the matched keys break the ``strict`` rule, naming both
    sides and a wrapper module that renamed every key (see :func:`wrapper_segment`)."""
    if strict not in (True, False, "exact"):
        raise ValueError(f"strict must be True, False or 'exact', not {strict!r}")
    missing, unexpected = keys.missing, keys.unexpected
    if strict is False:
        # a renamed module (DDP's module., torch.compile's _orig_mod.) cannot load even
        # partially: its load_state_dict would get the other names; say so before reading
        if wrapper_segment(missing, keys.adopt) is None:
            return
    elif not (missing or (strict == "exact" and unexpected)):
        return
    parts = []
    if missing:  # DCP's phrase, which existing code matches
        parts.append(f"Missing key in checkpoint state_dict: {_some(missing)}")
    # keys under a Stateful object (adopted) are the likely other half of a renaming
    others = sorted(unexpected + keys.adopt) if missing else unexpected
    if others and (missing or strict == "exact"):
        parts.append(f"in the checkpoint but not in the state dict: {_some(others)}")
    wrapper = wrapper_segment(missing, others)
    if wrapper is not None:
        name, where = wrapper
        parts.append(
            f"the keys differ by a {name!r} path component, which the {where} side has: "
            f"{_WRAPPERS.get(name, 'a wrapper module')} adds it. Save and load the same "
            "wrapping (e.g. the unwrapped model: model.module for DDP, model._orig_mod for "
            "torch.compile), or get the state dict with "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict, which drops it"
        )
    if wrapper is not None:
        hint = "strict=False cannot help: the names differ, not the set of tensors"
    elif strict is True:
        hint = "strict=False loads the keys present"
    else:
        hint = (
            "strict=True allows extra keys in the checkpoint, strict=False loads the keys present"
        )
    raise KeyMismatchError(
        f"state dict and checkpoint {checkpoint_id!r} disagree. {'; '.join(parts)}. {hint}.",
        missing=missing,
        unexpected=unexpected,
    )


_WRAPPERS = {
    "module": "DistributedDataParallel (or DataParallel)",
    "_orig_mod": "torch.compile",
    "_fsdp_wrapped_module": "FSDP1",
    "_checkpoint_wrapped_module": "activation checkpointing",
}


def wrapper_segment(missing: list[str], unexpected: list[str]) -> tuple[str, str] | None:
    """A path component that, removed from one side's keys, makes them the other's.

    Returns (component, "state dict" or "checkpoint"): the side whose keys have it.
    Decided on most of the missing keys, so one stray key does not hide it.
    """
    if not missing or not unexpected:
        return None
    found: dict[tuple[str, str], int] = {}
    for longer, shorter, side in (
        (missing, set(unexpected), "state dict"),
        (unexpected, set(missing), "checkpoint"),
    ):
        for key in longer[:200]:
            parts = key.split(".")
            for i, part in enumerate(parts):
                if ".".join(parts[:i] + parts[i + 1 :]) in shorter:
                    found[(part, side)] = found.get((part, side), 0) + 1
                    break
    if not found:
        return None
    (part, side), count = max(found.items(), key=lambda kv: kv[1])
    return (part, side) if count * 2 >= min(len(missing), 200) else None


def _some(keys: list[str]) -> str:
    return f"{keys[:20]}{' ...' if len(keys) > 20 else ''}"
