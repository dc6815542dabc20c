"""Build and load bgtrain's C++/CUDA extensions with torch.utils.cpp_extension (JIT, cached on disk).

Separate extensions keep nvcc off the CPU path and the evaluator off BoostLU's: ``bgtrain_boostlu_cpu`` (one C++
file, ~30 s to build once), ``bgtrain_boostlu_cuda`` (a .cu file plus its bindings, a few minutes on 2 cores for two
archs) and ``bgtrain_ap_cpu`` (the evaluator's radix-sort AP kernel, ~30 s once).

The cache folder is ``$BGTRAIN_OPS_CACHE`` or ``~/.cache/bgtrain/ops``; each build goes to a sub-folder named after
the torch version and install, a hash of the C++/CUDA sources and, for CUDA, the arch list, so builds for different
GPUs, torch installs or source edits never overwrite each other. The sources are copied into that folder before
building: ninja rebuilds whenever a compile command changes, and the command holds the source path, so building from
the copy lets every checkout of the same code that uses the same torch (a git worktree, an installed wheel) reuse
one build.
torch's own file lock makes concurrent ranks wait for one build instead of racing.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("boostlu_cpu.cpp",)
AP_CPU_SOURCES = ("ap_cpu.cpp",)
AP_CPU_NAME = "bgtrain_ap_cpu"
CUDA_SOURCES = ("boostlu_cuda_bind.cpp", "boostlu_cuda.cu")
DEFAULT_ARCHS = "8.0;9.0"  # A100 and H100/H200, used when no GPU is visible to pick the arch from


@dataclass(frozen=True)
class BuildInfo:
    """Where an extension was built and for which target (CUDA archs, or "cpu")."""

    name: str
    path: Path
    archs: str
    reused: bool = False  # the cache already held this build: nothing was compiled


def cache_root() -> Path:
    """Root of the extension build cache: $BGTRAIN_OPS_CACHE or ~/.cache/bgtrain/ops."""
    env = os.environ.get("BGTRAIN_OPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bgtrain" / "ops"


@functools.cache
def _torch_tag() -> str:
    """torch's version and a hash of where it is installed.

    The compile command holds torch's include paths, so two virtualenvs with the same torch version would make
    ninja rebuild each time the other one built; a folder per install keeps both builds.
    """
    install = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:6]
    return re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}") + f"_{install}"


@functools.cache  # the sources do not change while a process runs
def sources_digest() -> str:
    """First 10 hex digits of a sha256 over every file in csrc/ (names and bytes): the build folders' content key."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


def _stage_sources(build_dir: Path) -> Path:
    """Copy csrc/ into build_dir/src (atomically, once) and return it: the build never sees the checkout's path."""
    staged = build_dir / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for path in CSRC.iterdir():
        target = staged / path.name
        # The folder is keyed by the sources' hash, so an existing file already holds these bytes; rewriting it
        # would only bump its mtime and make ninja rebuild.
        if path.is_file() and not target.exists():
            tmp = staged / f".{path.name}.{os.getpid()}.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
    return staged


def resolve_archs(archs: str | None = None) -> str:
    """Arch list to build for: the argument, else $TORCH_CUDA_ARCH_LIST, else the visible GPUs, else 8.0;9.0."""
    chosen = archs or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not chosen and torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        chosen = ";".join(f"{major}.{minor}" for major, minor in caps)
    chosen = chosen or DEFAULT_ARCHS
    parts = [p for p in re.split(r"[;\s,]+", chosen.strip()) if p]
    for part in parts:
        if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", part):
            raise ValueError(f"bad CUDA arch {part!r} in {chosen!r} (from --arch or TORCH_CUDA_ARCH_LIST); "
                             "expected e.g. '8.0;9.0' or '9.0+PTX'")
    return ";".join(parts)


def gencode_flags(archs: str) -> list[str]:
    """nvcc -gencode flags for an arch list such as '8.0;9.0+PTX'."""
    flags = []
    for part in archs.split(";"):
        ptx = part.endswith("+PTX")
        num = part.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def find_cuda_home() -> str:
    """CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the folder above nvcc's real path, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc), so also try /usr/local/cuda
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if (cand / "include" / "cuda_runtime.h").exists() and (cand / "bin" / "nvcc").exists():
            return str(cand)
    raise RuntimeError("no CUDA toolkit found for the BoostLU CUDA extension: set CUDA_HOME to the toolkit root "
                       "(the folder holding bin/nvcc and include/cuda_runtime.h), e.g. CUDA_HOME=/usr/local/cuda")


class ToolchainError(RuntimeError):
    """The CUDA extension cannot be built here; the message is one line naming the cause and the fix."""


def nvcc_version(cuda_home: str) -> str:
    """``major.minor`` of the nvcc under `cuda_home` (``nvcc --version``'s "release X.Y")."""
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise ToolchainError(f"cannot run {nvcc} --version: {err}") from err
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise ToolchainError(f"{nvcc} --version does not say which CUDA release it is: {out.strip()[:200]!r}")
    return f"{m.group(1)}.{m.group(2)}"


def check_cuda_toolchain() -> str:
    """Raise ToolchainError (one line: the cause and the fix) unless the CUDA extension can be built here.

    Checks, in order: torch is a CUDA build, a CUDA toolkit (nvcc) is found, and its major version is torch's
    (cpp_extension refuses a major mismatch after a long traceback). Returns the toolkit root.
    """
    if torch.version.cuda is None:
        raise ToolchainError(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): install a "
                             "CUDA build of torch to use the BoostLU CUDA extension")
    try:
        home = find_cuda_home()
    except RuntimeError as err:
        raise ToolchainError(f"no nvcc: {err}") from err
    if not (Path(home) / "bin" / "nvcc").is_file():
        raise ToolchainError(f"no nvcc: {Path(home) / 'bin' / 'nvcc'} does not exist (CUDA_HOME/CUDA_PATH={home}); "
                             "set CUDA_HOME to the CUDA toolkit root, e.g. /usr/local/cuda")
    found = nvcc_version(home)
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise ToolchainError(f"CUDA major mismatch: nvcc in {home} is CUDA {found}, torch {torch.__version__} was "
                             f"built with CUDA {torch.version.cuda}: set CUDA_HOME to a CUDA "
                             f"{torch.version.cuda.split('.')[0]}.x toolkit")
    return home


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line: its type, the first line of its message and, for a compiler's output, the first
    line that says error."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    cut = lambda text: text if len(text) <= limit else text[:limit] + "..."  # noqa: E731
    text = cut(lines[0])
    cause = next((ln for ln in lines[1:] if re.search(r"\berror\b|\bfatal\b", ln, re.IGNORECASE)), None)
    return f"{type(err).__name__}: {text}" + (f" ... {cut(cause)}" if cause else "")


@contextlib.contextmanager
def _this_pythons_ninja() -> Iterator[None]:
    """Put the folder of this Python (a venv's bin/, which holds the `ninja` pip package) first on PATH while
    cpp_extension runs ninja.

    ninja versions hash build commands differently (1.11 and 1.13 do), so a build made by one looks stale to the
    other: a process started without the venv on PATH (system ninja) and one started with it (the venv's ninja)
    rebuilt each other's extension in turn, at whichever step first needed it. One Python, one ninja.
    """
    here = Path(sys.executable).parent
    if not (here / "ninja").is_file():
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(here), old]) if old else str(here)
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _load(name: str, sources: tuple[str, ...], build_dir: Path, cuda_flags: list[str] | None,
          verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    src = _stage_sources(build_dir)
    kwargs: dict[str, Any] = {}
    if cuda_flags is not None:
        # cpp_extension reads CUDA_HOME once at import and guesses wrong when nvcc is a wrapper; set it for the build.
        cpp_extension.CUDA_HOME = check_cuda_toolchain()
        kwargs["extra_cuda_cflags"] = ["-O3", *cuda_flags]  # no fast-math: keep IEEE division for exact rounding
    with _this_pythons_ninja():
        return cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in sources],
            # at::parallel_for is inlined from ATen's headers and runs serially unless the extension itself is built
            # with OpenMP; the libgomp it links is the one torch has already loaded (same soname), not a second runtime.
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=cuda_flags is not None,
            is_python_module=True,
            verbose=verbose,
            **kwargs,
        )


_LOADED: dict[str, ModuleType] = {}  # by module name: each extension is built and imported once per process


def _load_once(name: str, sources: tuple[str, ...], build_dir: Path, cuda_flags: list[str] | None,
               verbose: bool) -> ModuleType:
    if name not in _LOADED:
        _LOADED[name] = _load(name, sources, build_dir, cuda_flags, verbose)
    return _LOADED[name]


def load_cpu(verbose: bool = False) -> ModuleType:
    """Build (first time) and import the CPU extension."""
    return _load_once("bgtrain_boostlu_cpu", CPU_SOURCES, cpu_build_dir(), None, verbose)


def load_ap_cpu(verbose: bool = False) -> ModuleType:
    """Build (first time) and import the evaluator's CPU AP kernel (bgtrain/ops/csrc/ap_cpu.cpp)."""
    return _load_once(AP_CPU_NAME, AP_CPU_SOURCES, ap_cpu_build_dir(), None, verbose)


def ap_cpu_is_built() -> bool:
    """Whether the AP kernel is loaded or a build of it sits in the cache (loading it then needs no compiler)."""
    return AP_CPU_NAME in _LOADED or any(ap_cpu_build_dir().glob(f"{AP_CPU_NAME}*.so"))


def load_cuda(archs: str | None = None, verbose: bool = False) -> ModuleType:
    """Build (first time) and import the CUDA extension for the given arch list (see resolve_archs)."""
    resolved = resolve_archs(archs)
    return _load_once(_cuda_name(resolved), CUDA_SOURCES, cuda_build_dir(resolved), gencode_flags(resolved), verbose)


def build_cuda(archs: str, build_dir: Path, verbose: bool = False) -> ModuleType:
    """Compile and link the CUDA extension for `archs` into `build_dir` and import it (no GPU needed to build)."""
    return _load(_cuda_name(archs), CUDA_SOURCES, build_dir, gencode_flags(archs), verbose)


def _cuda_name(archs: str) -> str:
    return "bgtrain_boostlu_cuda_sm" + _arch_tag(archs)  # one module name per arch set: both can live in a process


def _arch_tag(archs: str) -> str:
    return archs.replace(";", "_").replace(".", "").replace("+", "")


def cpu_build_dir(root: Path | None = None) -> Path:
    """Build folder of the CPU extension."""
    return (root or cache_root()) / f"cpu-{_torch_tag()}-{sources_digest()}"


def ap_cpu_build_dir(root: Path | None = None) -> Path:
    """Build folder of the evaluator's CPU AP kernel."""
    return (root or cache_root()) / f"ap-cpu-{_torch_tag()}-{sources_digest()}"


def cuda_build_dir(archs: str, root: Path | None = None) -> Path:
    """Build folder of the CUDA extension for an arch list."""
    tag = f"cuda-sm{_arch_tag(archs)}-{_torch_tag()}-cu{torch.version.cuda}-{sources_digest()}"
    return (root or cache_root()) / tag


def _stamp(build_dir: Path, name: str) -> int | None:
    """The built module's mtime, or None: equal before and after a load means ninja compiled nothing."""
    so = build_dir / f"{name}.so"
    return so.stat().st_mtime_ns if so.is_file() else None


def build(archs: str | None = None, cpu_only: bool = False, verbose: bool = False) -> list[BuildInfo]:
    """Build the CPU extensions and, unless cpu_only, the CUDA one now; return where they went.

    Idempotent: a build already in the cache is loaded, not compiled again (``BuildInfo.reused``). For CUDA the
    toolchain is checked first (:func:`check_cuda_toolchain`), so a machine that cannot build fails in one line.
    """
    resolved = None
    if not cpu_only:
        resolved = resolve_archs(archs)
        check_cuda_toolchain()
    infos = []
    for load, build_dir, name in ((load_cpu, cpu_build_dir(), "bgtrain_boostlu_cpu"),
                                  (load_ap_cpu, ap_cpu_build_dir(), AP_CPU_NAME)):
        before = _stamp(build_dir, name)
        module = load(verbose)
        infos.append(BuildInfo(module.__name__, _module_file(module), "cpu",
                               before is not None and before == _stamp(build_dir, name)))
    if resolved is not None:
        build_dir, name = cuda_build_dir(resolved), _cuda_name(resolved)
        before = _stamp(build_dir, name)
        module = load_cuda(resolved, verbose)
        infos.append(BuildInfo(module.__name__, _module_file(module), resolved,
                               before is not None and before == _stamp(build_dir, name)))
    return infos


def _module_file(module: ModuleType) -> Path:
    if module.__file__ is None:  # a built extension is always a file; None would be a namespace package
        raise RuntimeError(f"extension module {module.__name__} has no file")
    return Path(module.__file__)
