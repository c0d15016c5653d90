"""Engine argv builders: one per backend, always argv lists, never a shell string."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..config import ModelConfig
from ..errors import RouterdError


class BackendError(RouterdError):
    status = 500
    code = "backend_error"


@dataclass(frozen=True)
class GpuAssignment:
    """Where the scheduler placed a model on the GPUs, decided at load time.

    The engine sees only ``devices`` (CUDA_VISIBLE_DEVICES, in NVML's PCI bus order), so
    ``main_gpu`` and the entries of ``tensor_split`` are positions in that tuple."""

    gpu_layers: int  # -ngl: of the n_layer + 1 layers (output included), how many go to GPUs
    devices: tuple[int, ...] = ()  # NVML indices; () = none: the engine sees no GPU
    tensor_split: tuple[float, ...] = ()  # proportions per device when there are several
    main_gpu: int = 0

    def env(self) -> dict[str, str]:
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in self.devices)}

    def split_arg(self) -> str:
        return ",".join(f"{x:g}" for x in self.tensor_split)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything the spawner needs, fully resolved."""

    model: str  # routerd's model name
    path: str  # the .gguf / llamafile file (may be "" for a command backend)
    backend: str  # llama-server | llamafile | llama-cpp-python | command
    ctx_size: int = ModelConfig.ctx_size
    parallel: int = 1
    gpu_layers: int | None = None  # None = engine default / auto
    embeddings: bool = True
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    projector: str | None = None
    gpus: tuple[int, ...] | None = None  # `gpu: N` / `gpus: [..]`: only these; None = any
    # Set by the scheduler for the load it starts (not part of the model's identity):
    # None = routerd manages no GPU, the engine's own default applies.
    placement: GpuAssignment | None = None
    # Also set per load: where llama-server saves and restores its slots (the prompt cache
    # kept across swaps, scheduler/cache.py), and the CPU threads booked for it
    # (scheduler/cpu.py). None = not managed.
    slot_save_path: str | None = None
    threads: int | None = None
    rpc: tuple[str, ...] = ()  # llama.cpp rpc-servers ("host:port"): llama-server --rpc
    rerank: bool = False  # llama-server --reranking (rank pooling: /v1/rerank, no embeddings)

    def identity(self) -> tuple:
        """What, if changed, means the worker must be restarted (config reload)."""
        return (self.path, self.backend, self.ctx_size, self.parallel, self.gpu_layers,
                self.embeddings, self.args, self.command, self.projector, self.gpus, self.rpc,
                self.rerank)


@dataclass(frozen=True)
class Argv:
    """What to exec. The worker's API key is never in `argv` (any local user can read
    /proc/PID/cmdline): it goes in `env` (/proc/PID/environ is the owner's only) or, with
    `key_file_flag`, in a 0600 file the worker writes and removes once the engine is up."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    lifeline_flag: bool = False  # the engine understands --lifeline-fd
    key_file_flag: str | None = None  # e.g. "--api-key-file": the key goes in a private file


# routerd's own engine (and `command` workers) read their API key from here.
ENGINE_KEY_ENV = "ROUTERD_WORKER_API_KEY"


def find_binary(program: str, setting: str = "auto") -> str | None:
    """An engine binary: a path, or auto = `program` on PATH, then the one `make install`
    built beside routerd (.venv/bin/<program>)."""
    if setting != "auto":
        return setting if os.access(setting, os.X_OK) else None
    found = shutil.which(program)
    if found:
        return found
    beside = Path(sys.executable).parent / program
    return str(beside) if os.access(beside, os.X_OK) else None


def find_llama_server(setting: str = "auto") -> str | None:
    """`engines.llama_server`: a path, or auto = PATH, then the one `make install` built."""
    return find_binary("llama-server", setting)


def is_llamafile(path: str) -> bool:
    """A llamafile is an executable ZIP (APE launcher in front), not a bare GGUF."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head != b"GGUF" and (path.endswith(".llamafile") or _has_zip_end(path))


def _has_zip_end(path: str) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def resolve_backend(backend: str, path: str, llama_server: str | None) -> str:
    if backend != "auto":
        return backend
    if path and is_llamafile(path):
        return "llamafile"
    return "llama-server" if llama_server else "llama-cpp-python"


def build_argv(spec: LaunchSpec, *, host: str, port: int, api_key: str,
               llama_server: str | None) -> Argv:
    if spec.rpc and spec.backend != "llama-server":
        raise BackendError(f"model {spec.model!r}: rpc needs backend llama-server "
                           f"(it resolved to {spec.backend})")
    if spec.backend == "llama-server":
        if not llama_server:
            raise BackendError("backend llama-server: no llama-server binary found "
                               "(set engines.llama_server or run make install)")
        return Argv([llama_server, "-m", spec.path, *_server_flags(spec, host, port)],
                    env={**_gpu_env(spec), "LLAMA_API_KEY": api_key})
    if spec.backend == "llamafile":
        # APE executables run through sh, which works whatever binfmt_misc says.
        # llamafile's older server may not read LLAMA_API_KEY: a 0600 key file it reads.
        return Argv(["sh", spec.path, "--server", "--nobrowser",
                     *_server_flags(spec, host, port, modern=False)],
                    env=_gpu_env(spec), key_file_flag="--api-key-file")
    if spec.backend == "llama-cpp-python":
        argv = [sys.executable, "-m", "routerd.engine", "--model", spec.path,
                "--host", host, "--port", str(port), "--ctx-size", str(spec.ctx_size),
                "--parallel", str(spec.parallel), "--alias", spec.model,
                "--n-gpu-layers", _ngl(spec, "-1"), *_split_flags(spec),
                *_thread_flags(spec, batch=True)]
        if spec.embeddings:
            argv.append("--embeddings")
        return Argv([*argv, *spec.args], env={**_gpu_env(spec), ENGINE_KEY_ENV: api_key},
                    lifeline_flag=True)
    if spec.backend == "command":
        subst = {"port": str(port), "host": host, "api_key": api_key, "model": spec.path,
                 "name": spec.model, "ctx_size": str(spec.ctx_size),
                 "parallel": str(spec.parallel)}
        # The key in the environment too; `{api_key}` in a command's argv is the operator's
        # choice (and visible to local users: README says so).
        return Argv([_format(a, subst) for a in spec.command] + list(spec.args),
                    env={ENGINE_KEY_ENV: api_key, "LLAMA_API_KEY": api_key})
    raise BackendError(f"unknown backend {spec.backend!r}")


def _format(arg: str, subst: dict[str, str]) -> str:
    for k, v in subst.items():
        arg = arg.replace("{" + k + "}", v)
    return arg


def _server_flags(spec: LaunchSpec, host: str, port: int, *,
                  modern: bool = True) -> Sequence[str]:
    """llama-server flags (the key comes by environment or file, never here). `modern=False`
    leaves out what llamafile's older server lacks."""
    flags = ["--host", host, "--port", str(port), "-c", str(spec.ctx_size),
             "-np", str(spec.parallel), "--alias", spec.model]
    if modern:
        # What runs must match what the budget booked: no engine-side auto-fitting, every
        # layer offloaded when a GPU exists (gpu_layers: auto), and no prompt cache growing
        # in RAM outside the estimate (llama-server defaults to up to 8 GiB).
        flags += ["--no-webui", "--fit", "off", "--cache-ram", "0", "-ngl", _ngl(spec, "all")]
    elif spec.placement is not None or spec.gpu_layers is not None:
        flags += ["-ngl", _ngl(spec, "999")]
    flags += _split_flags(spec)
    flags += _thread_flags(spec, batch=modern)
    if modern and spec.rpc:
        flags += ["--rpc", ",".join(spec.rpc)]
    if modern and spec.slot_save_path:
        flags += ["--slot-save-path", spec.slot_save_path]
    if spec.rerank:  # rank pooling; it serves /v1/rerank instead of mean-pooled embeddings
        flags += ["--reranking"]
    elif spec.embeddings:
        flags += ["--embedding", "--pooling", "mean"]
    if spec.projector:
        flags += ["--mmproj", spec.projector]
    return [*flags, *spec.args]


THREAD_FLAGS = ("-t", "--threads")
THREAD_BATCH_FLAGS = ("-tb", "--threads-batch")


def explicit_threads(args: Sequence[str]) -> int | None:
    """The thread count a model's own `args` set (`-t N`, `--threads N`, `--threads=N`):
    that wins over routerd's CPU budget. None when they set none (or not a number)."""
    for i, a in enumerate(args):
        value = None
        if a in THREAD_FLAGS and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--threads="):
            value = a.split("=", 1)[1]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _thread_flags(spec: LaunchSpec, *, batch: bool) -> list[str]:
    """-t (and -tb) from the CPU budget, unless the model's args set their own."""
    if spec.threads is None or explicit_threads(spec.args) is not None:
        return []
    flags = ["--threads", str(spec.threads)]
    if batch and not any(a in THREAD_BATCH_FLAGS or a.startswith("--threads-batch=")
                         for a in spec.args):
        flags += ["--threads-batch", str(spec.threads)]
    return flags


def _ngl(spec: LaunchSpec, all_layers: str) -> str:
    """-ngl: the placement's count; without one (no GPU routerd can see) the configured
    number, or every layer for gpu_layers: auto (the engine offloads to what it finds)."""
    if spec.placement is not None:
        return str(spec.placement.gpu_layers)
    return all_layers if spec.gpu_layers is None else str(spec.gpu_layers)


def _split_flags(spec: LaunchSpec) -> list[str]:
    """--tensor-split and --main-gpu when a model is split over several GPUs (the same flag
    names in llama-server, llamafile and routerd's own worker)."""
    p = spec.placement
    if p is None or len(p.devices) < 2:
        return []
    return ["--tensor-split", p.split_arg(), "--main-gpu", str(p.main_gpu)]


def _gpu_env(spec: LaunchSpec) -> dict[str, str]:
    """The devices the engine may use. CUDA_VISIBLE_DEVICES works the same for every
    backend (llama-server's --device names differ per build and fail on a CPU build)."""
    return spec.placement.env() if spec.placement is not None else {}
