"""Checkpoints: the only module that touches checkpoint files.

Writes are atomic (temporary file, fsync, rename, fsync of the folder), so a kill at any moment
leaves either the old or the new file, and a failed write (disk full) leaves no temporary file.
:class:`CheckpointSaver` writes in a background thread: training pauses only to copy the state to host
memory, at most one write is in flight, and a failed write is raised at the next step or at the end,
naming the path. ``best.pt`` is a hard link to the step file it names, not a second write. A resume
reads the checkpoint once per rank: :func:`load` checks every member's CRC on the bytes it loads.
``checkpoints/history.json`` lists this run's step checkpoints in the order they were written:
``resume: latest`` takes the newest of them that loads (saying which it skipped and why), and only
they are pruned to the last K. :func:`prepare_resume` decides, before training starts, whether a run
may start or resume in its ``out_dir``. Everything is loaded with ``weights_only=True``.

With ``checkpoint.mirror`` (a URL) the background write also uploads each step checkpoint to
``<mirror>/checkpoints/``, and only then writes its ``step-N.pt.complete`` marker (size, sha256, step, whether it
was the best): an object without a marker, or whose size disagrees with it, is never resumed from. The mirror keeps
its own ``history.json`` and a ``best.json`` naming the best step object (kept while it is the best, since an
object store has no hard links), and is pruned to the last K like the folder (marker first, then object).
``resume: latest`` falls back to the mirror when the folder has no checkpoint that loads, downloading the newest
complete one (and the best one) into the folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import threading
import time
import typing
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from bgtrain import storage
from bgtrain.cli import DataError, UsageError
from bgtrain.config import ConfigError, TrainConfig, _build, to_dict

_NAME = re.compile(r"^step-(\d{9})\.pt$")
HISTORY = "history.json"
COMPLETE = ".complete"   # the marker object beside a mirrored step checkpoint, written once it is fully uploaded
BEST_JSON = "best.json"  # the mirror's best.pt: which step object is the best
RUN_FILES = ("metrics.jsonl", "results.json")   # what a run writes beside checkpoints/
# Config keys whose change makes a resumed checkpoint meaningless: refused unless forced.
RESUME_BREAKING = ("model.depth", "loss.scheme")
# Keys that may differ on every resume without being reported.
RESUME_IGNORED = ("checkpoint.resume", "out_dir", "name")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to ``path`` so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, killed, ...: a half-written temporary file would only fill the disk more
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_atomically(target: Path, link: Path) -> None:
    """Make ``link`` another name of ``target`` (a hard link), replacing what ``link`` was in one step.

    A file system without hard links (some network and FUSE mounts) gets an atomic copy instead.
    """
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(link.parent)


def to_host(state: object) -> object:
    """A copy of ``state`` whose tensors live in host memory and share nothing with the training's tensors.

    Device tensors are copied without blocking and waited for once; host tensors are cloned, since training
    updates weights and optimizer state in place while the background write is reading them.
    """
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def copy(x: object) -> object:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x.detach().clone()
            out = torch.empty_like(x, device="cpu", pin_memory=True)
            copies.append((out, x))
            return out
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    out = copy(state)
    for dst, src in copies:
        dst.copy_(src.detach(), non_blocking=True)
    if copies:
        torch.cuda.synchronize()
    return out


def why_unloadable(path: str | Path, full: bool = False) -> str | None:
    """None when ``path`` looks like a complete checkpoint file, else the reason (zero bytes, truncated, corrupt).

    torch.save writes a zip archive. Opening it reads only its central directory at the end of the file, which a
    truncated copy has lost: that is the cheap check used to choose a checkpoint. ``full`` also reads every
    member through its CRC, which finds flipped bytes; :func:`load` does that on the bytes it loads anyway.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "zero bytes"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip() if full else None
    except zipfile.BadZipFile as e:
        return f"truncated or not a checkpoint ({e})"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return f"corrupt member {bad} (CRC mismatch)" if bad else None


def load(path: str | Path) -> dict:
    """Load a checkpoint safely (tensors and plain containers only), reading the file once.

    The bytes read are checked member by member against the archive's CRCs before they are unpickled, so a
    corrupt file is one line naming it and the member, never a half-loaded state.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    data = io.BytesIO(path.read_bytes())
    try:
        with zipfile.ZipFile(data) as z:
            bad = z.testzip()
        if bad is not None:
            raise DataError(f"checkpoint {path} cannot be loaded: corrupt member {bad} (CRC mismatch)")
        data.seek(0)
        return torch.load(data, map_location="cpu", weights_only=True)
    except zipfile.BadZipFile as e:
        reason = "zero bytes" if not data.getbuffer().nbytes else f"truncated or not a checkpoint ({e})"
        raise DataError(f"checkpoint {path} cannot be loaded: {reason}") from e
    except (RuntimeError, EOFError) as e:  # torch's ways of saying foreign
        raise DataError(f"checkpoint {path} cannot be loaded: {str(e).splitlines()[0]}") from e


def load_measured(path: str | Path) -> tuple[dict, dict]:
    """:func:`load`, and what it cost: ``load_s``, the file's size and the bytes this process read meanwhile."""
    from bgtrain.runlog import bytes_read
    started, before = time.perf_counter(), bytes_read()
    state = load(path)
    after = bytes_read()
    return state, {"load_s": round(time.perf_counter() - started, 4), "file_bytes": Path(path).stat().st_size,
                   "bytes_read": None if before is None or after is None else after - before}


def peek(path: str | Path) -> dict:
    """A checkpoint's entries without reading its tensors (memory-mapped): config, loader, best, rng."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"checkpoint {path} cannot be loaded: {why_unloadable(path) or str(e).splitlines()[0]}") from e


def rng_state() -> dict:
    """This process's RNG states, as tensors and lists so that weights_only loading accepts them."""
    np_state = np.random.get_state(legacy=True)
    if isinstance(np_state, dict):  # only for a bit generator other than the global MT19937
        raise RuntimeError("numpy's global RNG is not MT19937; its state cannot be checkpointed")
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if torch.cuda.is_available() and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class MirrorError(Exception):
    """An upload to the mirror that failed for good; its cause is the storage error."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.url = url


class CheckpointSaver:
    """Owns ``<out_dir>/checkpoints``: step checkpoints, this run's history of them, the last K, ``best.pt``;
    and with ``mirror`` (a URL) their copies under ``<mirror>/checkpoints``."""

    def __init__(self, folder: str | Path, keep_last: int = 2, mirror: str | None = None) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.mirror = storage.join(mirror, "checkpoints") if mirror else None   # the mirror's checkpoints/
        self.skipped: list[str] = []   # "PATH: reason" for each checkpoint `latest` passed over
        self.notes: list[str] = []     # what a resume from the mirror did (downloads, unfinished uploads passed over)
        self._mirror_best: str | None = None   # the step object the mirror's best.json names
        self._mirror_best_read = False
        self._mirror_kept: set[str] = set()    # pruned from this run's history but kept in the mirror as the best
        self._history: list[str] | None = None
        self._thread: threading.Thread | None = None   # the write in flight
        self._writing: Path | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0   # the training loop's pause for the latest save (copy to host memory)
        self.last_write_s = 0.0   # the latest background write (serialise, fsync, rename, prune)

    def steps(self) -> list[Path]:
        """Every step checkpoint in the folder, by step number (this run's or not)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def _recorded(self) -> list[str] | None:
        """The names in ``history.json``, or None when the folder has none."""
        path = self.folder / HISTORY
        try:
            return [str(n) for n in json.loads(path.read_text())["steps"]]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a checkpoint history ({e}); delete it to use step numbers") from None

    def history(self) -> list[str]:
        """Names of this run's step checkpoints, oldest first (all step files for a folder without history)."""
        if self._history is not None:
            return self._history
        recorded = self._recorded()
        # Written by an older bgtrain: its step files are the run that `latest` continues.
        return recorded if recorded is not None else [p.name for p in self.steps()]

    def latest(self) -> Path | None:
        """The newest checkpoint of this run that loads; the ones passed over go to :attr:`skipped`."""
        self.skipped = []
        for name in reversed(self.history()):
            path = self.folder / name
            if not path.is_file():
                continue
            reason = why_unloadable(path)
            if reason is None:
                return path
            self.skipped.append(f"{path}: {reason}")
        return None

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        """Start writing ``step-N.pt`` (and linking ``best.pt``) in the background; returns its path.

        The caller pauses only while ``state`` is copied to host memory; the write, fsync, rename, history and
        pruning happen in a thread. A write still in flight is waited for first (at most one at a time), and a
        failed one is raised here if :meth:`check` has not raised it already.
        """
        self.wait()
        path = self.folder / f"step-{step:09d}.pt"
        started = time.perf_counter()
        host = to_host(state)
        self.last_stall_s = time.perf_counter() - started
        self._writing = path
        self._thread = threading.Thread(target=self._write, args=(host, path, is_best), name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()
        return path

    def _write(self, state: dict, path: Path, is_best: bool) -> None:
        started = time.perf_counter()
        try:
            self.write_now(state, path, is_best)
        except BaseException as e:  # handed to the training thread by check() / wait()
            self._error = e
        self.last_write_s = time.perf_counter() - started

    def write_now(self, state: dict, path: Path, is_best: bool = False) -> None:
        """Write ``path`` atomically, point ``best.pt`` at it, record it in the history and prune to the last K."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save(state, path)
        if is_best:
            link_atomically(path, self.folder / "best.pt")
        # A fresh run starts its own history: step files it did not write (or resume from) are never pruned.
        own = self._history if self._history is not None else (self._recorded() or [])
        history = [n for n in own if n != path.name] + [path.name]
        for name in history[: -self.keep_last]:
            (self.folder / name).unlink(missing_ok=True)
        self._history = history[-self.keep_last:]
        _write_json(self.folder / HISTORY, {"steps": self._history})
        if self.mirror is not None:
            try:
                self._upload(path, is_best, history)
            except Exception as e:  # noqa: BLE001 - raised by wait() naming the checkpoint and the mirror
                raise MirrorError(self.mirror) from e

    def _url(self, name: str) -> str:
        assert self.mirror is not None
        return storage.join(self.mirror, name)

    def _read_mirror_best(self) -> str | None:
        """The step object the mirror's best.json names (read once; None when there is none)."""
        if not self._mirror_best_read:
            try:
                self._mirror_best = str(json.loads(storage.read_bytes(self._url(BEST_JSON)))["file"])
            except FileNotFoundError:
                self._mirror_best = None
            except (ValueError, KeyError, TypeError):
                self._mirror_best = None   # rewritten at this run's next best
            self._mirror_best_read = True
        return self._mirror_best

    def _remove_mirrored(self, name: str) -> None:
        storage.remove(self._url(name + COMPLETE))   # marker first: a half-pruned checkpoint is never resumed from
        storage.remove(self._url(name))

    def _upload(self, path: Path, is_best: bool, history: list[str]) -> None:
        """Mirror the step file just written: history (naming it), object, marker, best.json, pruning, history."""
        best = self._read_mirror_best()
        # The new name is recorded before its object exists (resume skips names without a marker), and the pruned
        # names stay recorded until they are deleted, so a kill at any point leaves no object the history forgets.
        storage.write_bytes(self._url(HISTORY), json.dumps({"steps": history}).encode())
        url = self._url(path.name)
        numbered = _NAME.match(path.name)
        marker = {"step": int(numbered[1]) if numbered else None, "size": path.stat().st_size,
                  "sha256": _sha256(path), "best": is_best}
        storage.remove(url + COMPLETE)   # an abandoned run's marker for this name must not vouch for the new bytes
        storage.upload(path, url)
        storage.write_bytes(url + COMPLETE, json.dumps(marker).encode())
        if is_best:
            storage.write_bytes(self._url(BEST_JSON), json.dumps({"file": path.name, "step": marker["step"]}).encode())
            self._mirror_best = path.name
            if best is not None and best != path.name and best in self._mirror_kept:
                self._remove_mirrored(best)   # kept only because it was the best
                self._mirror_kept.discard(best)
            best = path.name
        for name in history[: -self.keep_last]:
            if name == best:
                self._mirror_kept.add(name)
            else:
                self._remove_mirrored(name)
        storage.write_bytes(self._url(HISTORY), json.dumps({"steps": self._history}).encode())

    def _mirror_history(self) -> tuple[list[str], bool]:
        """The mirror's step objects, oldest first, and whether they come from its history.json."""
        url = self._url(HISTORY)
        try:
            return [str(n) for n in json.loads(storage.read_bytes(url))["steps"]], True
        except FileNotFoundError:
            assert self.mirror is not None
            return [n for n in storage.listdir(self.mirror) if _NAME.match(n)], False
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{url}: not a checkpoint history ({e}); delete it to use step numbers") from None

    def _complete_marker(self, name: str) -> dict | None:
        """The marker of a mirrored step object whose upload completed and whose size agrees; else None (noted)."""
        url = self._url(name)
        try:
            marker = json.loads(storage.read_bytes(url + COMPLETE))
            size, _ = int(marker["size"]), str(marker["sha256"])
        except FileNotFoundError:
            self.notes.append(f"passed over {url}: no {COMPLETE} marker (its upload did not finish)")
            return None
        except (ValueError, KeyError, TypeError) as e:
            self._skip_mirrored(url, f"unreadable marker {url}{COMPLETE} ({e})")
            return None
        try:
            actual = storage.size(url)
        except FileNotFoundError:
            self._skip_mirrored(url, "its marker exists but the object does not")
            return None
        if actual != size:
            self._skip_mirrored(url, f"{actual} bytes, its marker says {size}")
            return None
        return marker

    def _skip_mirrored(self, url: str, reason: str) -> None:
        warnings.warn(f"skipped mirrored checkpoint {url}: {reason}", stacklevel=3)
        self.skipped.append(f"{url}: {reason}")

    def _download(self, name: str, marker: dict, path: Path) -> bool:
        """Download a mirrored step object to ``path``; False (skipped, warned) if it is not the bytes marked."""
        url = self._url(name)
        self.folder.mkdir(parents=True, exist_ok=True)
        storage.download(url, path)
        reason = why_unloadable(path)
        if reason is None and _sha256(path) != marker["sha256"]:
            reason = "its sha256 differs from its marker's"
        if reason is not None:
            path.unlink(missing_ok=True)
            self._skip_mirrored(url, reason)
            return False
        return True

    def fetch_latest(self) -> Path | None:
        """``resume: latest`` without a local checkpoint: download the newest complete mirrored one into the folder.

        Its history up to it becomes the folder's (and the mirror's, at the next save), and when its state has a
        best epoch, the best checkpoint comes along as ``best.pt``. None when the mirror has no complete one.
        """
        names, recorded = self._mirror_history()
        for i in reversed(range(len(names))):
            name = names[i]
            marker = self._complete_marker(name)
            path = self.folder / name
            if marker is None or not self._download(name, marker, path):
                continue
            self.notes.append(f"downloaded mirrored checkpoint {self._url(name)} to {path}")
            try:
                self._fetch_best(path, marker)
            except BaseException:
                path.unlink(missing_ok=True)   # a later `latest` must not take it without its best.pt
                raise
            # The pruned names after it stay listed, so this run's next save deletes them from the mirror.
            self._history = names[: i + 1] if recorded else [name]
            _write_json(self.folder / HISTORY, {"steps": self._history})
            return path
        return None

    def _fetch_best(self, path: Path, marker: dict) -> None:
        """Bring the mirror's best checkpoint of ``path``'s run to ``best.pt`` (the final test reads it)."""
        best = peek(path).get("best") or {}
        dst = self.folder / "best.pt"
        if not best.get("epoch") or (dst.is_file() and why_unloadable(dst) is None and peek(dst).get("best") == best):
            return
        if marker.get("best"):   # written as the best: best.json may not have been updated before a kill
            link_atomically(path, dst)
            return
        name = self._read_mirror_best()
        named = self._complete_marker(name) if name is not None else None
        found = downloaded = False
        if name is not None and named is not None and named.get("best"):
            downloaded = self._download(name, named, dst)
            found = downloaded and peek(dst).get("best") == best
        if not found:
            if downloaded:
                dst.unlink(missing_ok=True)
            raise DataError(f"checkpoint.resume: the best epoch so far ({best['epoch']}, val mAP "
                            f"{best.get('val_map', float('nan')):.2f}) of {self._url(path.name)} is not in "
                            f"{self._url(BEST_JSON)} (missing, or names another epoch's checkpoint)")
        self.notes.append(f"downloaded mirrored best checkpoint {self._url(str(name))} to {dst}")

    def check(self) -> None:
        """Raise a background write that failed, naming its path; cheap enough for every step."""
        if self._error is not None and self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self, raise_error: bool = True) -> None:
        """Wait for the write in flight (and its upload); raise it, naming the path, if it failed (unless
        ``raise_error`` is False, for a run that is already failing and must not hide its own error behind this one)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if isinstance(error, MirrorError) and raise_error:
            cause = error.__cause__ or error
            raise DataError(f"checkpoint {self._writing} was not uploaded to {error.url}: {cause}") from cause
        if error is not None and raise_error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise DataError(f"checkpoint {self._writing} was not written: {reason}") from error

    def resolve(self, resume: str | None) -> Path | None:
        """The checkpoint ``checkpoint.resume`` names: None, "latest" (None if there is none yet) or a path."""
        if resume is None:
            return None
        path = self.latest() if resume == "latest" else Path(resume)
        if path is None and resume == "latest" and self.mirror is not None:
            path = self.fetch_latest()
        if path is None:
            return None
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} does not exist")
        if resume != "latest" and (reason := why_unloadable(path)) is not None:
            raise DataError(f"checkpoint.resume: {path} cannot be loaded: {reason}")
        if path.parent.resolve() == self.folder.resolve() and path.name in self.history():
            # Resuming from an older checkpoint abandons the newer ones: they are no longer this run's history.
            self._history = self.history()[: self.history().index(path.name) + 1]
        return path


def _write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def run_leftovers(out_dir: str | Path) -> list[Path]:
    """Files of an earlier run in ``out_dir``: step checkpoints, best.pt, metrics.jsonl, results.json."""
    out_dir = Path(out_dir)
    found = [out_dir / n for n in RUN_FILES if (out_dir / n).is_file()]
    folder = out_dir / "checkpoints"
    if folder.is_dir():
        found += sorted(p for p in folder.iterdir() if _NAME.match(p.name) or p.name == "best.pt")
    return found


def move_aside(out_dir: str | Path) -> Path:
    """``--overwrite``: move everything in ``out_dir`` into ``out_dir/replaced-<UTC time>/``; returns that folder.

    Moving (not deleting) keeps the old run's results until the user removes them; earlier ``replaced-*``
    folders stay where they are.
    """
    out_dir = Path(out_dir)
    target = out_dir / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
    target.mkdir()
    for item in sorted(out_dir.iterdir()):
        if item != target and not item.name.startswith("replaced-"):
            os.replace(item, target / item.name)
    return target


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every config key that differs, ignoring the ones a resume always changes."""
    a, b = _flat(old), _flat(new)
    missing = object()
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if k not in RESUME_IGNORED and a.get(k, missing) != b.get(k, missing)]


def _num_classes(state: dict) -> int | None:
    try:
        return int(_model_state(state, Path("?"))["classifier.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        return None


def classes_in(path: str | Path) -> int | None:
    """How many classes a checkpoint's classifier has, read without loading its tensors; None if it has none."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return _num_classes(peek(path))


def _epoch_end_checkpoint(path: Path) -> Path | None:
    """The newest end-of-epoch checkpoint kept next to ``path`` (loader position at batch 0), else best.pt."""
    folder = CheckpointSaver(path.parent)
    for name in [*reversed(folder.history()), "best.pt"]:
        cand = folder.folder / name
        if cand.is_file() and why_unloadable(cand) is None and peek(cand)["loader"]["batches_done"] == 0:
            return cand
    return None


def check_mid_epoch(state: dict, path: Path, cfg: TrainConfig, world_size: int) -> None:
    """Refuse a mid-epoch resume whose epoch plan would differ (world size, workers, batch size)."""
    loader = state.get("loader", {})
    if not loader.get("batches_done"):
        return  # at an epoch boundary nothing of the old plan is left to continue
    old_cfg = state.get("config", {}).get("data", {})
    old = {"world size": len(state.get("rng", [])), "data.workers": old_cfg.get("workers"),
           "data.batch_size": old_cfg.get("batch_size"), "data.backend": old_cfg.get("backend")}
    new = {"world size": world_size, "data.workers": cfg.data.workers, "data.batch_size": cfg.data.batch_size,
           "data.backend": cfg.data.backend}
    changed = [k for k in old if old[k] != new[k]]
    if not changed:
        return
    way_out = _epoch_end_checkpoint(path)
    how = (f"resume from the end-of-epoch checkpoint {way_out}" if way_out is not None else
           "resume from an end-of-epoch checkpoint (none is kept next to it)")
    raise UsageError(
        f"{path} was taken mid-epoch (epoch {loader.get('epoch')}, batch {loader['batches_done']}) with "
        + ", ".join(f"{k} {old[k]}" for k in changed) + "; this run has "
        + ", ".join(f"{k} {new[k]}" for k in changed)
        + f", so the rest of that epoch cannot be continued exactly: {how}, or keep the old values")


def _adopt_best(saver: CheckpointSaver, state: dict, path: Path, is_main: bool) -> str | None:
    """Resuming into another folder: bring the source's ``best.pt`` along so the final test finds it."""
    best = state.get("best") or {}
    dst = saver.folder / "best.pt"
    if not best.get("epoch") or path.parent.resolve() == saver.folder.resolve() or dst.is_file():
        return None
    src = path.parent / "best.pt"
    if path.name == "best.pt":
        src = path
    if not src.is_file() or why_unloadable(src) is not None or peek(src).get("best") != best:
        raise DataError(f"checkpoint.resume: the best epoch so far ({best['epoch']}, val mAP "
                        f"{best.get('val_map', float('nan')):.2f}) of {path} is not in {src} (missing or from "
                        f"another epoch); copy that epoch's best.pt to {dst}, or resume into {path.parent.parent}")
    if is_main:
        saver.folder.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".best.pt.tmp{os.getpid()}")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
    return f"copied {src} to {dst} (best epoch so far: {best['epoch']})"


def prepare_resume(cfg: TrainConfig, world_size: int, rank: int = 0, restarts: int = 0, overwrite: bool = False,
                   force: bool = False) -> tuple[TrainConfig, list[str]]:
    """Decide where this run starts, before any process group: the config to train and notes to print.

    A fresh run refuses an ``out_dir`` holding another run unless ``overwrite`` (which moves it aside on
    rank 0). A resume picks its checkpoint (``latest`` skips files that do not load), reports config changes
    and refuses the ones that make it meaningless unless ``force``, refuses a mid-epoch position the new
    world cannot continue, and brings ``best.pt`` along into a new ``out_dir``. The returned config names the
    chosen checkpoint in ``checkpoint.resume`` (or None: start from scratch).
    """
    out_dir = Path(cfg.out_dir)
    saver = CheckpointSaver(out_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.mirror)
    resume = cfg.checkpoint.resume
    if resume is None and restarts > 0:
        resume = "latest"  # a torchrun restart is this run's next attempt
    notes: list[str] = []
    path = saver.resolve(resume)
    notes += [f"skipped checkpoint {s}" for s in saver.skipped]
    own = path is not None and path.parent.resolve() == saver.folder.resolve()
    if path is None and resume == "latest" and notes:
        where = f"{saver.folder} or {saver.mirror}" if saver.mirror else saver.folder
        raise DataError(f"checkpoint.resume=latest: no checkpoint in {where} loads ({'; '.join(notes)})")
    notes += saver.notes
    if not own and resume != "latest" and (leftovers := run_leftovers(out_dir)):
        if not overwrite:
            shown = ", ".join(str(p) for p in leftovers[:3]) + (" ..." if len(leftovers) > 3 else "")
            raise UsageError(f"out_dir {out_dir} holds another run ({shown}); resume it with "
                             "checkpoint.resume=latest, pass --overwrite to move its files into "
                             f"{out_dir}/replaced-<time>/, or choose another out_dir")
        if rank == 0:
            notes.append(f"--overwrite: moved the earlier run in {out_dir} to {move_aside(out_dir)}")
    if path is None:
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=None)), notes
    state = peek(path)
    changes = config_diff(state.get("config", {}), to_dict(cfg))
    for key, old, new in changes:
        notes.append(f"config changed on resume: {key}: {old!r} -> {new!r}")
    breaking = [f"{k} ({old!r} -> {new!r})" for k, old, new in changes if k in RESUME_BREAKING]
    from shards.format import read_manifest
    saved_classes, classes = _num_classes(state), len(read_manifest(cfg.data.shards)["classes"])
    if saved_classes is not None and saved_classes != classes:
        breaking.append(f"class count ({saved_classes} in the checkpoint, {classes} in {cfg.data.shards})")
    if breaking and not force:
        raise UsageError(f"resuming {path} with changed {', '.join(breaking)} would not continue that run; "
                         "start a fresh run (another out_dir), or pass --force-resume to resume anyway")
    check_mid_epoch(state, path, cfg, world_size)
    if (note := _adopt_best(saver, state, path, rank == 0)) is not None:
        notes.append(note)
    notes.append(f"resuming from {path}")
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(path))), notes


def _known_keys(cls: type, tree: dict, prefix: str, dropped: list[str]) -> dict:
    """``tree`` without the keys ``cls`` no longer has (recursively), their dotted names added to ``dropped``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in tree.items():
        if key not in fields:
            dropped.append(prefix + key)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            out[key] = _known_keys(hints[key], value, f"{prefix}{key}.", dropped)
        else:
            out[key] = value
    return out


def config_from_checkpoint(state: dict):
    """The TrainConfig a checkpoint was trained with (its ``config`` entry, typed and checked).

    Explanations only need the model and data sections, so keys that this version of the config no longer has
    (a checkpoint from an older bgtrain) are dropped with a warning instead of refusing the checkpoint.
    """
    if "config" not in state:
        raise ConfigError("checkpoint has no 'config' entry (was it written by bgtrain.train?)")
    dropped: list[str] = []
    tree = _known_keys(TrainConfig, state["config"], "", dropped)
    if dropped:
        warnings.warn(f"checkpoint config keys unknown to this bgtrain, ignored: {', '.join(dropped)}",
                      stacklevel=2)
    return _build(TrainConfig, tree, "")


def _model_state(state: dict, path: Path) -> dict:
    engine = state.get("engine")
    if not isinstance(engine, dict) or "model" not in engine:
        raise KeyError(f"{path}: no engine.model state dict in this checkpoint "
                       f"(top-level keys: {sorted(state)})")
    # Wrappers (DDP, torch.compile) prefix parameter names; the bare module does not.
    out = {}
    for key, value in engine["model"].items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def load_model_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """A checkpoint's CamResNet in eval mode on ``device``, and the TrainConfig it was trained with."""
    from bgtrain.model import build_model

    path = Path(path)
    state = load(path)
    cfg = config_from_checkpoint(state)
    weights = _model_state(state, path)
    if "classifier.weight" not in weights:
        raise KeyError(f"{path}: model state has no classifier.weight (is this a CamResNet checkpoint?)")
    num_classes = weights["classifier.weight"].shape[0]
    # The trained weights replace any pretrained file, which may not exist on this machine.
    model = build_model(dataclasses.replace(cfg.model, pretrained=None, channels_last=False), num_classes)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg
