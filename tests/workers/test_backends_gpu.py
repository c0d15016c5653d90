"""The engine argv and environment for each GPU placement, per backend."""

from __future__ import annotations

import sys

import pytest

from routerd.config import ConfigError, parse_config
from routerd.engine.options import parse_args
from routerd.workers.backends import GpuAssignment, LaunchSpec, build_argv

ONE = GpuAssignment(gpu_layers=33, devices=(1,))
SPLIT = GpuAssignment(gpu_layers=49, devices=(2, 0), tensor_split=(9728.0, 6144.5))
CPU = GpuAssignment(gpu_layers=0)


def built(backend: str, placement: GpuAssignment | None, **kw: object) -> tuple[list[str], dict[str, str]]:
    spec = LaunchSpec(model="m", path="/models/m.gguf", backend=backend, placement=placement,
                      **kw)  # type: ignore[arg-type]
    a = build_argv(spec, host="127.0.0.1", port=5, api_key="k", llama_server="/bin/llama-server")
    return a.argv, {k: v for k, v in a.env.items() if k.startswith("CUDA_")}  # the GPU part


def after(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("backend, ngl_flag", [
    ("llama-server", "-ngl"), ("llamafile", "-ngl"), ("llama-cpp-python", "--n-gpu-layers")])
def test_one_gpu(backend: str, ngl_flag: str) -> None:
    args, env = built(backend, ONE)
    assert after(args, ngl_flag) == "33"
    assert "--tensor-split" not in args and "--main-gpu" not in args
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}


@pytest.mark.parametrize("backend, ngl_flag", [
    ("llama-server", "-ngl"), ("llamafile", "-ngl"), ("llama-cpp-python", "--n-gpu-layers")])
def test_split_over_two_gpus(backend: str, ngl_flag: str) -> None:
    args, env = built(backend, SPLIT)
    assert after(args, ngl_flag) == "49"
    # Positions in CUDA_VISIBLE_DEVICES: the engine sees GPU 2 as its device 0.
    assert after(args, "--tensor-split") == "9728,6144.5" and after(args, "--main-gpu") == "0"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,0" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.mark.parametrize("backend, ngl_flag", [
    ("llama-server", "-ngl"), ("llamafile", "-ngl"), ("llama-cpp-python", "--n-gpu-layers")])
def test_kept_off_the_gpus(backend: str, ngl_flag: str) -> None:
    args, env = built(backend, CPU)
    assert after(args, ngl_flag) == "0" and env["CUDA_VISIBLE_DEVICES"] == ""


def test_no_placement_keeps_what_was_there() -> None:
    args, env = built("llama-server", None)
    assert after(args, "-ngl") == "all" and env == {}
    assert after(built("llama-server", None, gpu_layers=7)[0], "-ngl") == "7"
    assert "-ngl" not in built("llamafile", None)[0]
    assert after(built("llama-cpp-python", None)[0], "--n-gpu-layers") == "-1"


def test_placement_is_not_part_of_the_identity() -> None:
    a = LaunchSpec(model="m", path="/m", backend="llama-server")
    b = LaunchSpec(model="m", path="/m", backend="llama-server", placement=ONE)
    assert a.identity() == b.identity()
    assert a.identity() != LaunchSpec(model="m", path="/m", backend="llama-server",
                                      gpus=(1,)).identity()


def test_routerd_worker_parses_the_split_flags() -> None:
    args, _ = built("llama-cpp-python", SPLIT)
    assert args[:3] == [sys.executable, "-m", "routerd.engine"]
    opts, unknown = parse_args(args[3:])
    assert opts.n_gpu_layers == 49 and opts.tensor_split == (9728.0, 6144.5)
    assert opts.main_gpu == 0 and unknown == []
    assert parse_args(["-m", "x"])[0].tensor_split == ()
    with pytest.raises(SystemExit):
        parse_args(["-m", "x", "--tensor-split", "a,b"])


def models(**spec: object) -> dict[str, object]:
    return {"models": {"m": {"model": "/m.gguf", **spec}}}


def test_config_gpu_pins() -> None:
    assert parse_config(models()).models["m"].gpus is None
    assert parse_config(models(gpu=1)).models["m"].gpus == (1,)
    assert parse_config(models(gpus=[0, 2])).models["m"].gpus == (0, 2)
    assert parse_config(models(gpus=[])).models["m"].gpus == ()
    for bad in ({"gpu": -1}, {"gpu": "0"}, {"gpus": [0, 0]}, {"gpus": ["a"]}, {"gpus": 1},
                {"gpu": 0, "gpus": [1]}, {"gpus": [True]}):
        with pytest.raises(ConfigError) as e:
            parse_config(models(**bad))
        assert "models.m.gpu" in str(e.value)


def test_catalog_carries_the_pin() -> None:
    from routerd.catalog import Catalog

    cat = Catalog(parse_config(models(gpus=[1], backend="llama-server")))
    assert cat.resolve("m").launch.gpus == (1,)
