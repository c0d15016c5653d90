"""scripts/setup-engines.sh decides CPU or CUDA builds (issue 17): `--plan` prints the
decision and the cache paths without building anything. nvcc and nvidia-smi are faked."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_FLAGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def plan(tmp_path: Path, *, nvcc: bool, gpus: list[str], **env: str) -> tuple[int, dict[str, str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("nvcc", "nvidia-smi"):
        (bin_dir / tool).unlink(missing_ok=True)
    if nvcc:
        (bin_dir / "nvcc").write_text(
            "#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
        (bin_dir / "nvcc").chmod(0o755)
    if gpus:
        caps = "\\n".join(gpus)
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '{caps}\\n'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    # Only the fakes and the basic tools: a real nvcc elsewhere on PATH must not count.
    tools = bin_dir / "tools"
    tools.mkdir(exist_ok=True)
    for t in ("sha256sum", "cut", "tr", "grep", "sort", "paste", "sed", "head", "cat", "nproc"):
        src = subprocess.run(["bash", "-c", f"command -v {t}"], capture_output=True,
                             text=True).stdout.strip()
        if src.startswith("/") and not (tools / t).exists():
            (tools / t).symlink_to(src)
    r = subprocess.run([shutil.which("bash") or "/bin/bash", str(ROOT / "scripts/setup-engines.sh"), "--plan", ".venv"],
                       capture_output=True, text=True, cwd=ROOT, timeout=30,
                       env={"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path),
                            "ROUTERD_CACHE": str(tmp_path / "cache"), **env})
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return r.returncode, out


def test_no_nvcc_is_the_cpu_build_with_the_old_cache_key(tmp_path: Path) -> None:
    rc, out = plan(tmp_path, nvcc=False, gpus=["9.0"])
    key = hashlib.sha256(CPU_FLAGS.encode()).hexdigest()[:10]
    assert rc == 0 and out["cuda"] == "0" and out["flags"] == CPU_FLAGS
    assert out["wheel"].endswith(f"/llama-cpp-python-0.3.36-{key}")
    # llama-server (and rpc-server beside it) add the RPC backend (issue 16), so their key moved
    rpc_key = hashlib.sha256(f"{CPU_FLAGS} -DGGML_RPC=ON".encode()).hexdigest()[:10]
    assert out["server"].endswith(f"/bin/llama-server-0.3.36-{rpc_key}")
    assert out["rpc_server"].endswith(f"/bin/rpc-server-0.3.36-{rpc_key}")


def test_nvcc_without_a_gpu_stays_on_cpu(tmp_path: Path) -> None:
    rc, out = plan(tmp_path, nvcc=True, gpus=[])
    assert rc == 0 and out["cuda"] == "0"


def test_nvcc_and_a_gpu_build_cuda_for_its_architecture(tmp_path: Path) -> None:
    rc, out = plan(tmp_path, nvcc=True, gpus=["9.0", "9.0"])
    assert rc == 0 and out["cuda"] == "1" and out["arch"] == "90"
    assert "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" in out["flags"]
    assert CPU_FLAGS in out["flags"] and "-DCMAKE_CUDA_COMPILER=" in out["flags"]
    assert "/llama-server-0.3.36-cuda90-" in out["server"]
    assert "/llama-cpp-python-0.3.36-cuda90-" in out["wheel"]
    _, mixed = plan(tmp_path, nvcc=True, gpus=["8.6", "8.9"])
    assert mixed["arch"] == "86;89" and "-cuda86-89-" in mixed["server"]


def test_the_cache_key_covers_the_cuda_flags(tmp_path: Path) -> None:
    _, a = plan(tmp_path, nvcc=True, gpus=["9.0"])
    _, b = plan(tmp_path, nvcc=True, gpus=["8.0"])
    _, cpu = plan(tmp_path, nvcc=False, gpus=[])
    keys = {o["server"].rsplit("-", 1)[1] for o in (a, b, cpu)}
    assert len(keys) == 3


@pytest.mark.parametrize("env, cuda, rc", [
    ({"ROUTERD_CUDA": "0"}, "0", 0),
    ({"ROUTERD_CUDA": "1", "CMAKE_CUDA_ARCHITECTURES": "90"}, "1", 0),
])
def test_forced(tmp_path: Path, env: dict[str, str], cuda: str, rc: int) -> None:
    got_rc, out = plan(tmp_path, nvcc=True, gpus=["9.0"] if cuda == "0" else [], **env)
    assert got_rc == rc and out["cuda"] == cuda


def test_forced_cuda_without_nvcc_or_architecture_fails_clearly(tmp_path: Path) -> None:
    rc, _ = plan(tmp_path, nvcc=False, gpus=[], ROUTERD_CUDA="1")
    assert rc == 2
    rc, _ = plan(tmp_path, nvcc=True, gpus=[], ROUTERD_CUDA="1")
    assert rc == 2


def test_only_llama_server(tmp_path: Path) -> None:
    rc, out = plan(tmp_path, nvcc=False, gpus=[], ROUTERD_ENGINES="llama-server")
    assert rc == 0 and out["engines"] == "llama-server"
    assert os.path.basename(out["server"]).startswith("llama-server-")
