"""Model names and digests: Ollama's grammar, validation before any path is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routerd.errors import BadRequest
from routerd.store.manifests import ManifestError, parse_manifest
from routerd.store.names import (ModelName, is_url, parse_digest, parse_name, url_model_name)

HEX = "a" * 64


@pytest.mark.parametrize("text, full, display", [
    ("smollm2", "registry.ollama.ai/library/smollm2:latest", "smollm2:latest"),
    ("smollm2:latest", "registry.ollama.ai/library/smollm2:latest", "smollm2:latest"),
    ("SmolLM2:135m", "registry.ollama.ai/library/SmolLM2:135m", "SmolLM2:135m"),
    ("user/model:v1.0", "registry.ollama.ai/user/model:v1.0", "user/model:v1.0"),
    ("127.0.0.1:8080/library/smollm2", "127.0.0.1:8080/library/smollm2:latest",
     "127.0.0.1:8080/library/smollm2:latest"),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
    ("https://registry.ollama.ai/library/qwen2.5:0.5b", "registry.ollama.ai/library/qwen2.5:0.5b",
     "qwen2.5:0.5b"),
])
def test_parse_and_display(text: str, full: str, display: str) -> None:
    n = parse_name(text)
    assert n.full == full
    assert n.display == display


def test_scheme_and_digest() -> None:
    n = parse_name(f"http://localhost:5000/a/b:c@sha256:{HEX}")
    assert (n.scheme, n.host, n.namespace, n.model, n.tag, n.digest) == (
        "http", "localhost:5000", "a", "b", "c", HEX)
    assert parse_name("x").scheme == "https"


@pytest.mark.parametrize("bad", [
    "", " ", "../etc/passwd", "..", "a/../../b", "library/../x", "./x", "a/b/c/d", "x:..",
    "x:/y", "/abs", "a//b", "x y", "x\x00y", "mod\\el", "a/.b", "ns.dot/model", "x:-tag",
    ".hidden", "-dash", "x:tag:more/y", "x" * 81, "a/" + "n" * 81 + "/m", "ftp://h/a/b",
    "x@sha256:../../../../etc", f"x@sha256:{HEX[:-1]}", f"x@md5:{HEX}", "x%2f..", "~/x",
    "x\ny", "x:lat\nest",
])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_name(bad)


@pytest.mark.parametrize("good", [f"sha256:{HEX}", f"sha256-{HEX}"])
def test_digest_forms(good: str) -> None:
    assert parse_digest(good) == HEX


@pytest.mark.parametrize("bad", [
    f"sha256:{HEX.upper()}", f"sha256:{HEX}0", f"sha256:{HEX[:-1]}", "sha256:../../etc/passwd",
    f"sha512:{HEX}", f" sha256:{HEX}", f"sha256:{HEX}\n", "", f"sha256/{HEX}",
])
def test_bad_digests(bad: str) -> None:
    with pytest.raises(BadRequest):
        parse_digest(bad)


def test_manifest_path_layout(tmp_path: Path) -> None:
    n = parse_name("127.0.0.1:9/library/smollm2")
    assert n.manifest_path(tmp_path) == tmp_path / "manifests/127.0.0.1:9/library/smollm2/latest"


_chars = st.text(alphabet=st.sampled_from(list("aZ09_-.:/@\\%~ \x00")), min_size=1, max_size=40)


@settings(max_examples=400, deadline=None)
@given(_chars)
def test_any_accepted_name_stays_inside_the_store(text: str) -> None:
    root = Path("/srv/store")
    try:
        n = parse_name(text)
    except BadRequest:
        return
    path = n.manifest_path(root)
    assert root / "manifests" in path.parents
    assert ".." not in path.parts and len(path.relative_to(root / "manifests").parts) == 4


@pytest.mark.parametrize("url, name", [
    ("https://example.com/models/SmolLM2-135M-Instruct.Q4_1.gguf",
     "example.com/url/SmolLM2-135M-Instruct.Q4_1:latest"),
    ("http://127.0.0.1:8000/a/b/my%20model+v2.gguf", "127.0.0.1:8000/url/my-model-v2:latest"),
    ("https://user:pw@h.example/x/..gguf", "h.example/url/model:latest"),
])
def test_url_names(url: str, name: str) -> None:
    assert is_url(url)
    assert url_model_name(url).full == name
    parse_name(url_model_name(url).full)  # round-trips as a valid name


def test_not_urls() -> None:
    assert not is_url("smollm2")
    assert not is_url("https://registry.ollama.ai/library/smollm2")


def test_manifest_digests_validated() -> None:
    bad = (b'{"layers":[{"mediaType":"application/vnd.ollama.image.model",'
           b'"digest":"sha256:../../../../tmp/x","size":1}]}')
    with pytest.raises(ManifestError):
        parse_manifest(bad)
    with pytest.raises(ManifestError):
        parse_manifest(b'{"layers":[{"mediaType":"x","digest":"sha256:' + HEX.encode()
                       + b'","size":-1}]}')
    m = parse_manifest(b'{"layers":[{"mediaType":"application/vnd.ollama.image.model",'
                       b'"digest":"sha256-' + HEX.encode() + b'","size":3}]}')
    assert m.layers[0].digest == HEX and m.size == 3


def test_model_name_is_hashable_and_case_insensitive_key() -> None:
    a, b = parse_name("SmolLM2"), parse_name("smollm2")
    assert a.key() == b.key() and a != b
    assert isinstance(hash(a), int) and isinstance(a, ModelName)
