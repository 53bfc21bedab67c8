"""Synthetic transformer-like training state for checkpoint benchmarks.

The layout mimics what a real trainer hands to a checkpointer: a model state
dict with a few large float32 matrices and many small bias/norm vectors, an
Adam-like optimizer state dict (two moments per parameter plus a step tensor),
and a handful of plain Python values. Generation is deterministic per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import crc32c
import torch

MiB = 1 << 20
_F32 = 4
# Largest matrix is the MLP up-projection (d x 4d); keep it within 64 MiB.
_D_CHOICES = (128, 256, 512, 768, 1024, 1536, 2048)
_MIN_LAYERS = 4
_MAX_CHUNK = 64 * MiB


def _layer_shapes(d: int) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of one transformer block of width d."""
    return [
        ("ln1.weight", (d,)),
        ("ln1.bias", (d,)),
        ("attn.qkv.weight", (3 * d, d)),
        ("attn.qkv.bias", (3 * d,)),
        ("attn.out.weight", (d, d)),
        ("attn.out.bias", (d,)),
        ("ln2.weight", (d,)),
        ("ln2.bias", (d,)),
        ("mlp.up.weight", (4 * d, d)),
        ("mlp.up.bias", (4 * d,)),
        ("mlp.down.weight", (d, 4 * d)),
        ("mlp.down.bias", (d,)),
    ]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_shapes(size_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    """Choose parameter names/shapes so params + 2 Adam moments ~= size_bytes."""
    # Each parameter is stored three times (param, exp_avg, exp_avg_sq).
    budget = max(size_bytes // 3, 64 * 1024)
    d = _D_CHOICES[0]
    for cand in _D_CHOICES:
        per_layer = sum(_numel(s) for _, s in _layer_shapes(cand)) * _F32
        if per_layer * _MIN_LAYERS <= budget:
            d = cand
    per_layer = sum(_numel(s) for _, s in _layer_shapes(d)) * _F32
    # Embedding gets ~10% of the budget, capped at one chunk.
    vocab = max(16, min(budget // 10, _MAX_CHUNK) // (d * _F32))
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d))]
    remaining = budget - vocab * d * _F32
    n_layers = max(1, remaining // per_layer)
    for i in range(n_layers):
        shapes += [(f"layers.{i}.{n}", s) for n, s in _layer_shapes(d)]
    shapes += [("final_norm.weight", (d,)), ("final_norm.bias", (d,))]
    used = sum(_numel(s) for _, s in shapes) * _F32
    # Fill the remainder with lm_head slices so the total lands near the target.
    rest = budget - used
    i = 0
    while rest >= d * _F32:
        rows = min(rest, _MAX_CHUNK) // (d * _F32)
        shapes.append((f"lm_head.{i}.weight", (rows, d)))
        rest -= rows * d * _F32
        i += 1
    return shapes


def build_state(size_bytes: int, seed: int = 0) -> dict[str, Any]:
    """Build a nested state dict whose tensors total roughly size_bytes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = plan_shapes(size_bytes)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, (name, shape) in enumerate(shapes):
        p = torch.empty(shape, dtype=torch.float32)
        if len(shape) == 1:
            # Norm/bias vectors: constant-ish values like a freshly initialised net.
            p.fill_(1.0 if name.endswith("weight") else 0.0).add_(
                torch.randn(shape, generator=gen), alpha=1e-3
            )
        else:
            p.normal_(0.0, 0.02, generator=gen)
        model[name] = p
        optim_state[idx] = {
            "step": torch.tensor(float(seed), dtype=torch.float32),
            "exp_avg": torch.empty(shape).normal_(0.0, 1e-3, generator=gen),
            "exp_avg_sq": torch.empty(shape).uniform_(0.0, 1e-6, generator=gen),
        }
    param_groups = [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "params": list(range(len(shapes))),
        }
    ]
    return {
        "model": model,
        "optim": {"state": optim_state, "param_groups": param_groups},
        "step": 0,
        "lr": 3e-4,
        "run_name": f"synthetic-seed{seed}",
    }


def iter_tensors(obj: Any):
    """Yield every tensor in a nested dict/list/tuple structure, in a stable order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Total bytes held by tensors in obj."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(obj))


def count_tensors(obj: Any) -> int:
    return sum(1 for _ in iter_tensors(obj))


@torch.no_grad()
def mutate(state: dict[str, Any]) -> None:
    """Simulate one optimizer step in place: every tensor byte changes."""
    step = int(state["step"]) + 1
    state["step"] = step
    state["lr"] = 3e-4 * (0.999**step)
    state["optim"]["param_groups"][0]["lr"] = state["lr"]
    # A constant add touches every page (dirtying memory like a real step)
    # without the cost of a random draw per element.
    delta = 1e-6 * (1 + step % 7)
    for t in iter_tensors(state):
        t.add_(delta)


def empty_like_state(obj: Any) -> Any:
    """Same structure with uninitialised tensors: a load target for in-place loaders."""
    if isinstance(obj, torch.Tensor):
        return torch.empty_like(obj)
    if isinstance(obj, dict):
        return {k: empty_like_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [empty_like_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(empty_like_state(v) for v in obj)
    return obj


def clone_state(obj: Any) -> Any:
    """Deep copy with cloned tensors: the expected content of an async save."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return obj


def assert_state_equal(actual: Any, expected: Any, path: str = "") -> None:
    """Raise AssertionError on the first difference (structure, dtype or bytes)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{path}: expected tensor, got {type(actual).__name__}")
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            raise AssertionError(
                f"{path}: {actual.dtype}{tuple(actual.shape)} != "
                f"{expected.dtype}{tuple(expected.shape)}"
            )
        if not torch.equal(actual, expected):
            raise AssertionError(f"{path}: tensor contents differ")
    elif isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            raise AssertionError(f"{path}: dict keys differ")
        for k, v in expected.items():
            assert_state_equal(actual[k], v, f"{path}/{k}")
    elif isinstance(expected, (list, tuple)):
        # DCP may round-trip tuples as lists; compare element-wise.
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            raise AssertionError(f"{path}: sequence differs")
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_state_equal(a, e, f"{path}/{i}")
    elif actual != expected:
        raise AssertionError(f"{path}: {actual!r} != {expected!r}")


@dataclass(frozen=True)
class TensorDigest:
    """What assert_state_equal needs of a tensor, without keeping its bytes."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    crc: int


def digest_state(obj: Any) -> Any:
    """Same structure with each tensor replaced by a TensorDigest (CRC-32C of its bytes).

    Lets the runner remember what an async save must contain without cloning
    the whole state (which would double its memory at large sizes).
    """
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        crc = crc32c.crc32c(memoryview(flat.view(torch.uint8).numpy())) if flat.numel() else 0
        return TensorDigest(obj.dtype, tuple(obj.shape), crc)
    if isinstance(obj, dict):
        return {k: digest_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [digest_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(digest_state(v) for v in obj)
    return obj
