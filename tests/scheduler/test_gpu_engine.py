"""The real engine on a machine without a GPU: `gpus: auto` finds none through NVML, and a
model with `gpu_layers: auto` loads and answers on the CPU, booked in RAM only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Daemon

pytestmark = [pytest.mark.timeout(180), pytest.mark.engine]


def test_cpu_machine_with_gpus_auto_and_gpu_layers_auto_serves(tmp_path: Path,
                                                                model_path: Path) -> None:
    d = Daemon({"memory": {"ram_budget": "90%", "gpus": "auto"}, "models": {
        "s": {"model": str(model_path), "backend": "llama-server", "ctx_size": 512,
              "gpu_layers": "auto"}}}, tmp_path)
    try:
        out = d.post("/api/generate", {"model": "s", "prompt": "The capital of France is",
                                       "stream": False,
                                       "options": {"num_predict": 4, "temperature": 0}})
        assert out["response"].strip() and out["eval_count"] > 0
        ps = d.get("/api/ps")
        if ps["routerd"]["gpus"]:
            pytest.skip("this machine has a GPU NVML can see")
        m = ps["models"][0]
        assert m["size_vram"] == 0 and m["routerd"]["gpu"] is None
        assert set(m["routerd"]["booked"]) == {"ram"} and set(ps["routerd"]["budget"]) == {"ram"}
        assert ps["routerd"]["vram_over_booking"] == {}
    finally:
        assert d.stop() == 0, d.log()
