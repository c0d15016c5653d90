"""Config loading and validation: every error names the key and the file."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from routerd.config import Budget, ConfigError, load_config, parse_config, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text,seconds", [
    ("5m", 300), ("1h30m", 5400), ("10s", 10), ("250ms", 0.25), (30, 30), ("0", 0), (0, 0),
    ("-1", math.inf), (-1, math.inf), ("-5m", math.inf), ("1.5h", 5400),
])
def test_durations(text, seconds) -> None:  # type: ignore[no-untyped-def]
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5x", "", "m5", "1h30", True, None, [1]])
def test_bad_durations(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        parse_duration(bad, "keep_alive")


def test_sizes_and_budgets() -> None:
    assert parse_size("512MiB") == 512 * 1024**2
    assert parse_size("12GiB") == 12 * 1024**3
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size(1000) == 1000
    assert Budget.parse("75%", "k").resolve(1000) == 750
    assert Budget.parse("2GiB", "k").resolve(1) == 2 * 1024**3
    for bad in ("12 parsecs", "-1", "150%", "0%"):
        with pytest.raises(ConfigError):
            Budget.parse(bad, "memory.ram_budget")


def test_example_config_is_valid() -> None:
    c = load_config(ROOT / "config/routerd.example.yaml")
    assert c.port == 11434 and c.host == "127.0.0.1" and "smollm2" in c.models
    assert c.models["smollm2"].aliases == ("smol", "smollm2:latest")


def test_defaults() -> None:
    c = parse_config({})
    assert (c.host, c.port, c.keep_alive, c.max_queue, c.max_loaded) == ("127.0.0.1", 11434,
                                                                        300, 512, 0)
    assert c.auth.exempt_loopback is True and c.memory.gpus == "auto"


@pytest.mark.parametrize("data,key", [
    ({"port": "x"}, "port"),
    ({"port": 70000}, "port"),
    ({"keep_alive": "soon"}, "keep_alive"),
    ({"max_queue": 0}, "max_queue"),
    ({"memory": {"ram_budget": "lots"}}, "memory.ram_budget"),
    ({"memory": {"gpus": "some"}}, "memory.gpus"),
    ({"memory": {"gpus": [{"index": 0, "budget": "x"}]}}, "memory.gpus[0].budget"),
    ({"models": {"m": {"ctx_size": 4096}}}, "models.m.model"),
    ({"models": {"m": {"model": "/x.gguf", "backend": "vllm"}}}, "models.m.backend"),
    ({"models": {"m": {"model": "/x.gguf", "ctx_size": "big"}}}, "models.m.ctx_size"),
    ({"models": {"m": {"model": "/x.gguf", "parallel": 0}}}, "models.m.parallel"),
    ({"models": {"m": {"model": "/x.gguf", "args": "-fa on"}}}, "models.m.args"),
    ({"models": {"m": {"model": "/x.gguf", "colour": "red"}}}, "models.m.colour"),
    ({"models": {"a": {"model": "/a", "aliases": ["x"]}, "b": {"model": "/b", "aliases": ["x"]}}},
     "models.b.aliases"),
    ({"models": {"../evil": {"model": "/a"}}}, "models.../evil"),
    ({"tls": {"cert_file": "/c.pem"}}, "tls"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"default_model": "ghost", "models": {"m": {"model": "/x"}}}, "default_model"),
])
def test_errors_name_the_key(data, key, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.key == key
    assert str(f) in str(e.value) and key in str(e.value)


def test_yaml_syntax_error_names_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_env_overrides(tmp_path: Path) -> None:
    c = load_config(None, env={"ROUTERD_KEEP_ALIVE": "1m", "ROUTERD_MODELS_DIR": "/m"})
    assert c.keep_alive == 60 and c.models_dir == "/m"


def test_cli_check_config_and_serve_fail_before_binding(tmp_path: Path) -> None:
    bin_ = Path(sys.executable).parent / "routerd"
    ok = subprocess.run([bin_, "check-config", str(ROOT / "config/routerd.example.yaml")],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m:\n    model: /x.gguf\n    parallel: -3\n")
    r = subprocess.run([bin_, "check-config", str(bad)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "models.m.parallel" in r.stderr and str(bad) in r.stderr
    r = subprocess.run([bin_, "serve", "--config", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "models.m.parallel" in r.stderr
