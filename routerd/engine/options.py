"""Command line of routerd's own engine worker (`python -m routerd.engine`).

The flag names mirror llama-server's where they overlap, so the spawner in
`routerd.workers.backends` builds both argv alike.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Sequence

from routerd.config import ModelConfig

POOLING = ("mean", "cls", "last", "none")


@dataclass(frozen=True)
class EngineOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    ctx_size: int = ModelConfig.ctx_size
    parallel: int = 1
    n_gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()  # proportions per visible GPU; () = llama.cpp's default
    main_gpu: int = 0
    alias: str | None = None
    api_key: str | None = None
    embeddings: bool = False
    pooling: str = "mean"
    threads: int | None = None
    threads_batch: int | None = None
    batch_size: int = 512
    flash_attn: bool = False
    lifeline_fd: int | None = None

    @property
    def model_name(self) -> str:
        return self.alias or self.model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m routerd.engine",
                                description="routerd's llama-cpp-python worker (llama-server API)")
    p.add_argument("--model", "-m", required=True, help="path to the GGUF file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ctx-size", "-c", type=int, default=ModelConfig.ctx_size)
    p.add_argument("--parallel", "-np", type=int, default=1, help="slots reported to clients")
    p.add_argument("--n-gpu-layers", "-ngl", type=int, default=-1)
    p.add_argument("--tensor-split", "-ts", default="",
                   help="proportions per GPU, e.g. 3,1 (as llama-server)")
    p.add_argument("--main-gpu", "-mg", type=int, default=0)
    p.add_argument("--alias", "-a", default=None, help="model name in responses")
    p.add_argument("--api-key", default=None,
                   help="required as 'Authorization: Bearer KEY' (routerd passes it in "
                        "$ROUTERD_WORKER_API_KEY instead: argv is world-readable)")
    p.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings")
    p.add_argument("--pooling", choices=POOLING, default="mean")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--threads-batch", "-tb", type=int, default=None,
                   help="threads for prompt processing (default: as --threads)")
    p.add_argument("--batch-size", "-b", type=int, default=512)
    p.add_argument("--flash-attn", "-fa", action="store_true")
    p.add_argument("--lifeline-fd", type=int, default=None,
                   help="exit at once when this fd reaches EOF (the parent died)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[EngineOptions, list[str]]:
    """Parse the argv; unknown flags (llama-server-only extras) are returned, not fatal."""
    ns, unknown = _parser().parse_known_args(argv)
    if ns.parallel < 1:
        _parser().error("--parallel must be >= 1")
    if ns.ctx_size < 0:
        _parser().error("--ctx-size must be >= 0")
    try:
        split = tuple(float(x) for x in ns.tensor_split.replace("/", ",").split(",") if x)
    except ValueError:
        _parser().error(f"--tensor-split: expected numbers like 3,1, got {ns.tensor_split!r}")
    opts = EngineOptions(
        model=ns.model, host=ns.host, port=ns.port, ctx_size=ns.ctx_size,
        parallel=ns.parallel, n_gpu_layers=ns.n_gpu_layers, tensor_split=split,
        main_gpu=ns.main_gpu, alias=ns.alias,
        api_key=ns.api_key or os.environ.get("ROUTERD_WORKER_API_KEY") or None, embeddings=ns.embeddings, pooling=ns.pooling,
        threads=ns.threads, threads_batch=ns.threads_batch, batch_size=ns.batch_size,
        flash_attn=ns.flash_attn,
        lifeline_fd=ns.lifeline_fd,
    )
    return opts, list(unknown)
