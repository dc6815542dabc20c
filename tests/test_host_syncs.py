"""No host sync in the loader's and the step's hot path, checked in the source (issue "The first GPU run counts").

A host sync stalls the CPU until the GPU has run everything queued before it, so the next batch is not being
prepared while the step runs. On the CPU nothing syncs, so CI cannot see one happen; this test reads the code of
the functions every training step runs and fails on the patterns that sync on CUDA:

- ``torch.tensor(...)`` / ``torch.as_tensor(...)`` with ``device=``: Python data copied to the device, blocking;
- ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``.nonzero()``, ``bool(t)``, ``float(t)``, ``int(t)`` of a
  tensor that may be on the device;
- ``.to(<a device>)`` / ``.cuda()`` without ``non_blocking=True`` (a blocking host-to-device copy waits for the
  queued step);
- ``torch.cuda.synchronize`` / ``.synchronize()``.

Host-side (CPU) tensors are allowed by name, per function, each with the reason (:data:`HOST_SIDE`). The dynamic
side, a spy on host reads in real gloo steps, is tests/test_train_steps.py; on a GPU, ``python -m bgtrain.gpu_check``
runs every loss scheme's real steps under ``torch.cuda.set_sync_debug_mode("error")`` (check ``host_syncs``).
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import bgtrain.data.gpu_decode as gpu_decode
import bgtrain.trainer as trainer
from bgtrain.data import Loader
from bgtrain.data.common import normalise

REPO = Path(__file__).resolve().parents[1]
READS = {"item", "tolist", "cpu", "numpy", "nonzero"}
CASTS = {"bool", "float", "int"}

# Function -> names of host-side (CPU) values in it, whose reads cost no sync. Keep each reason next to it.
HOST_SIDE: dict[str, set[str]] = {
    "normalise": {"flip"},  # flip_mask's bool (B,) CPU mask (documented in normalise's signature)
    # raw: the backend's RawBatch (CPU labels, ids, valid mask); decoded: the backends' CPU "decoded" mask;
    # valid, sample_id, order, failed: CPU tensors derived from those, moved to the device only at the end
    "Loader._finish": {"raw", "decoded", "valid", "sample_id", "order", "failed", "len"},
    "decode_batch": {"decoded", "index", "rows", "len"},  # decoded, index: CPU tensors built here
    "decode_resize": set(),
    "_decode": {"len"},
    "resize_uint8": set(),
    "train_step": set(),
}

# Syncs the rule sees in files other people own, each to be fixed there; listed so the test keeps showing them.
# When one is fixed, this test fails until its line is removed here.
PENDING: set[tuple[str, str]] = set()


def _root(node: ast.AST) -> str | None:
    """The name an expression starts from: ``batch`` for ``batch.image[:n].sum()``."""
    while True:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.UnaryOp):
            node = node.operand
        elif isinstance(node, ast.BinOp):
            left, right = _root(node.left), _root(node.right)
            return left if left is not None else right
        else:
            return None


def _names_a_device(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "device" in node.id
    if isinstance(node, ast.Attribute):
        return node.attr == "device" or "device" in node.attr
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.startswith("cuda")
    return isinstance(node, ast.Call) and _root(node.func) == "torch" and getattr(node.func, "attr", "") == "device"


def _non_blocking(call: ast.Call) -> bool:
    return any(k.arg == "non_blocking" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def syncs_in(source: str, host_side: set[str]) -> list[tuple[int, str]]:
    """(line within ``source``, what) for every pattern in ``source`` that syncs the host with the device."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if not isinstance(node, ast.Call):
            continue
        func, text = node.func, ast.unparse(node)
        if isinstance(func, ast.Attribute):
            receiver = _root(func.value)
            if (func.attr in {"tensor", "as_tensor"} and receiver == "torch"
                    and any(k.arg == "device" and not (isinstance(k.value, ast.Constant) and k.value.value == "cpu")
                            for k in node.keywords)):
                found.append((node.lineno, f"{text}: Python data copied to the device (blocking)"))
            elif func.attr in READS and receiver not in host_side:
                found.append((node.lineno, f"{text}: host read of a tensor that may be on the device"))
            elif func.attr == "synchronize":
                found.append((node.lineno, f"{text}: synchronizes the host with the device"))
            elif ((func.attr == "cuda" or (func.attr == "to" and (
                    any(_names_a_device(a) for a in node.args[:1])
                    or any(k.arg == "device" for k in node.keywords))))
                    and not _non_blocking(node)):
                found.append((node.lineno, f"{ast.unparse(func)}({', '.join(map(ast.unparse, node.args))}) "
                                           "without non_blocking=True"))
        elif isinstance(func, ast.Name) and func.id in CASTS and node.args:
            arg = node.args[0]
            if not isinstance(arg, ast.Constant) and _root(arg) not in host_side | {"len"}:
                found.append((node.lineno, f"{text}: host read of a tensor that may be on the device"))
    return sorted(found)


HOT_PATH: dict[str, Callable] = {
    "normalise": normalise,
    "Loader._finish": Loader._finish,
    "decode_resize": gpu_decode.decode_resize,
    "decode_batch": gpu_decode.decode_batch,
    "_decode": gpu_decode._decode,
    "resize_uint8": gpu_decode.resize_uint8,
    "train_step": trainer.train_step,
}


def _where(fn: Callable, line: int) -> str:
    path = Path(inspect.getsourcefile(fn) or "?").resolve()
    first = inspect.getsourcelines(fn)[1]
    return f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{first + line - 1}"


def test_every_function_of_gpu_decode_is_checked():
    module_functions = {name for name, fn in vars(gpu_decode).items()
                        if inspect.isfunction(fn) and fn.__module__ == gpu_decode.__name__}
    assert module_functions <= set(HOT_PATH), sorted(module_functions - set(HOT_PATH))


@pytest.mark.parametrize("name", sorted(HOT_PATH))
def test_no_host_sync_in_the_loader_and_step_hot_path(name):
    fn = HOT_PATH[name]
    found = syncs_in(inspect.getsource(fn), HOST_SIDE[name])
    pending = {what for n, what in PENDING if n == name}
    unexpected = [f"{_where(fn, line)}: {what}" for line, what in found if what not in pending]
    assert not unexpected, ("host syncs in the hot path (fix them, or name a host-side CPU tensor in HOST_SIDE "
                            f"with the reason): {unexpected}")
    fixed = pending - {what for _, what in found}
    assert not fixed, f"fixed, remove from PENDING: {sorted(fixed)}"


def test_the_checker_catches_each_pattern():
    source = '''
    def step(batch, device, host_mask):
        a = torch.tensor([1.0, 2.0], device=device)
        b = torch.as_tensor(numbers, device=batch.image.device)
        c = batch.loss.item() + float(batch.loss) + int(batch.valid.sum())
        d = batch.ids.tolist(), bool(batch.valid.any()), batch.valid.nonzero(), batch.image.cpu()
        e = host_mask.to(device)
        f = host_mask.cuda()
        torch.cuda.synchronize()
        ok = (host_mask.tolist(), bool(host_mask.any()), host_mask.to(device, non_blocking=True),
              torch.tensor([1.0]), torch.tensor([1.0], device="cpu"), x.to(torch.bfloat16), len(batch.ids))
    '''
    found = syncs_in(source, {"host_mask"})
    assert [line for line, _ in found] == [3, 4, 5, 5, 5, 6, 6, 6, 6, 7, 8, 9], found
