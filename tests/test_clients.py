"""The official ollama and openai clients and the guide's LangChain code, unchanged, against a
real routerd serving SmolLM2 on each backend (llama-server, llama-cpp-python, llamafile)."""

from __future__ import annotations

import ollama
import openai
import pytest

from tests.conftest import MOON, Daemon

BACKENDS = ["smollm2", "smollm2-lcp", "smollm2-lf"]
OPTS = {"temperature": 0, "num_predict": 24, "seed": 1}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def oc(daemon: Daemon) -> ollama.Client:
    return ollama.Client(host=daemon.base_url, timeout=120)


@pytest.fixture(scope="module")
def ai(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", timeout=120,
                         max_retries=0)


@pytest.mark.parametrize("model", BACKENDS)
def test_ollama_chat(oc: ollama.Client, model: str) -> None:
    r = oc.chat(model=model, messages=[{"role": "user", "content": MOON}], options=OPTS)
    assert "Armstrong" in r.message.content
    assert r.done and r.done_reason in ("stop", "length")
    assert r.eval_count and r.eval_count > 0 and r.prompt_eval_count > 0
    assert r.total_duration >= r.eval_duration > 0
    parts = list(oc.chat(model=model, messages=[{"role": "user", "content": MOON}],
                         options=OPTS, stream=True))
    assert "Armstrong" in "".join(p.message.content for p in parts)
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert parts[-1].eval_count == r.eval_count  # temperature 0, same seed


@pytest.mark.parametrize("model", BACKENDS)
def test_ollama_generate(oc: ollama.Client, model: str) -> None:
    r = oc.generate(model=model, prompt=MOON, options=OPTS)
    assert "Armstrong" in r.response and r.done
    chunks = list(oc.generate(model=model, prompt=MOON, options=OPTS, stream=True))
    assert "Armstrong" in "".join(c.response for c in chunks)
    assert chunks[-1].done and chunks[-1].done_reason


@pytest.mark.parametrize("model", BACKENDS)
def test_openai_chat(ai: openai.OpenAI, model: str) -> None:
    r = ai.chat.completions.create(model=model, messages=[{"role": "user", "content": MOON}],
                                   temperature=0, max_tokens=24, seed=1)
    assert "Armstrong" in r.choices[0].message.content
    assert r.usage and r.usage.completion_tokens > 0
    stream = ai.chat.completions.create(model=model, messages=[{"role": "user", "content": MOON}],
                                        temperature=0, max_tokens=24, seed=1, stream=True)
    text = "".join((c.choices[0].delta.content or "") for c in stream if c.choices)
    assert "Armstrong" in text


@pytest.mark.parametrize("model", BACKENDS)
def test_openai_completions_and_embeddings(ai: openai.OpenAI, model: str) -> None:
    r = ai.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                              temperature=0)
    assert r.choices[0].text
    e = ai.embeddings.create(model=model, input=["hello", "world"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 576  # SmolLM2-135M n_embd


def test_ollama_embed(oc: ollama.Client) -> None:
    r = oc.embed(model="smollm2", input=["why is the sky blue?", "hello"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 576
    legacy = oc.embeddings(model="smol", prompt="hello")
    assert len(legacy.embedding) == 576


def test_list_ps_show(oc: ollama.Client, ai: openai.OpenAI) -> None:
    oc.generate(model="smollm2", prompt="hi", options={"num_predict": 1})
    names = {m.model for m in oc.list().models}
    assert set(BACKENDS) <= names
    tag = next(m for m in oc.list().models if m.model == "smollm2")
    assert tag.details.family == "llama" and tag.details.quantization_level == "Q4_1"
    assert tag.size > 90_000_000
    running = {m.model: m for m in oc.ps().models}
    assert "smollm2" in running
    assert running["smollm2"].size > 0 and running["smollm2"].context_length == 2048
    info = oc.show("smollm2")
    assert info.details.parameter_size and info.modelinfo["general.architecture"] == "llama"
    assert info.modelinfo["llama.embedding_length"] == 576
    assert {m.id for m in ai.models.list().data} >= set(BACKENDS)


def test_errors_in_each_dialect(oc: ollama.Client, ai: openai.OpenAI) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        oc.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(openai.NotFoundError) as e2:
        ai.chat.completions.create(model="no-such-model", messages=[{"role": "user",
                                                                      "content": "x"}])
    assert e2.value.body["code"] == "model_not_found"


def test_langchain_guide(daemon: Daemon, model_path) -> None:  # type: ignore[no-untyped-def]
    from langchain_community.llms.llamafile import Llamafile
    from langchain_ollama import ChatOllama, OllamaLLM

    llm = OllamaLLM(model="smollm2", base_url=daemon.base_url, temperature=0, num_predict=24)
    assert "Armstrong" in llm.invoke(MOON)
    assert "Armstrong" in "".join(llm.stream(MOON))
    chat = ChatOllama(model="smollm2", base_url=daemon.base_url, temperature=0, num_predict=24)
    assert "Armstrong" in chat.invoke(MOON).content
    # Llamafile posts to /completion with no model: routerd uses default_model.
    lf = Llamafile(base_url=daemon.base_url, temperature=0, n_predict=24)
    out = lf.invoke("Question: " + MOON + "\nAnswer:")
    assert isinstance(out, str) and out
    assert "".join(lf.stream("The capital of France is"))


def test_langchain_llamacpp_same_file(model_path) -> None:  # type: ignore[no-untyped-def]
    """The guide's LlamaCpp runs in-process on the same GGUF routerd serves (our build)."""
    from langchain_community.llms import LlamaCpp

    llm = LlamaCpp(model_path=str(model_path), n_ctx=512, temperature=0, max_tokens=24,
                   verbose=False)
    assert "Armstrong" in llm.invoke(f"<|im_start|>user\n{MOON}<|im_end|>\n<|im_start|>assistant\n")


def test_cli_client_commands(daemon: Daemon) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    routerd = str(Path(sys.executable).parent / "routerd")
    env = {**os.environ, "ROUTERD_HOST": daemon.base_url}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([routerd, *args], capture_output=True, text=True, env=env,
                              timeout=120, stdin=subprocess.DEVNULL)

    # `routerd run` samples with the model's defaults (as `ollama run` does): the answer's
    # facts vary from run to run, so this checks that an answer came back, not what it says
    r = run("run", "smollm2", MOON)
    assert r.returncode == 0 and len(r.stdout.split()) >= 3, (r.stdout, r.stderr)
    r = run("list")
    assert r.returncode == 0 and "smollm2-lcp" in r.stdout and "NAME" in r.stdout
    r = run("list", "--sources")
    assert r.returncode == 0 and "config" in r.stdout
    r = run("ps")
    assert r.returncode == 0 and "smollm2" in r.stdout
    r = run("show", "smollm2")
    assert r.returncode == 0 and "llama" in r.stdout
    r = run("stop", "smollm2-lcp")
    assert r.returncode == 0, r.stderr
    assert "smollm2-lcp" not in {m["name"] for m in daemon.get("/api/ps")["models"]}
    r = run("logs", "smollm2")
    assert r.returncode == 0 and r.stdout.strip()
    r = run("show", "no-such-model")
    assert r.returncode == 1 and "Error" in r.stderr


def test_llama_cpp_native_surface_routed_by_model(daemon: Daemon) -> None:
    import httpx

    # SmolLM2 has no fill-in-the-middle tokens: the engine's own refusal comes through
    r = httpx.post(daemon.base_url + "/infill", timeout=60, json={
        "model": "smollm2", "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n",
        "n_predict": 4})
    assert r.status_code == 502 and "Infill is not supported" in r.json()["error"]["message"]
    prompt = daemon.post("/apply-template", {"model": "smollm2", "messages": [
        {"role": "user", "content": "Hi"}]})["prompt"]
    assert "Hi" in prompt and "<|im_start|>" in prompt
    vec = daemon.post("/embedding", {"model": "smollm2", "content": "Hello"})
    assert vec and vec[0]["embedding"]
    assert daemon.post("/embeddings", {"model": "smollm2", "input": "Hello"})
    slots = daemon.get("/slots?model=smollm2")
    assert isinstance(slots, list) and len(slots) == 2  # the daemon's parallel: 2
    assert daemon.get("/lora-adapters?model=smollm2") == []
    saved = daemon.post("/slots/0?action=erase&model=smollm2", {})  # the test daemon: no keys
    assert saved.get("id_slot") == 0


@pytest.mark.parametrize("model", BACKENDS)
def test_native_endpoints(daemon: Daemon, model: str) -> None:
    toks = daemon.post(f"/tokenize?model={model}", {"content": "Hello world"})["tokens"]
    assert toks and all(isinstance(t, int) for t in toks)
    text = daemon.post("/detokenize", {"model": model, "tokens": toks})["content"]
    assert "Hello world" in text
    props = daemon.get(f"/props?model={model}")
    assert props["default_generation_settings"]["n_ctx"] >= 1024  # per slot
    done = daemon.post("/completion", {"model": model, "prompt": "The capital of France is",
                                       "n_predict": 6, "temperature": 0})
    assert done["content"] and done["stop"] is True
    assert daemon.get(f"/upstream/{model}/props")["default_generation_settings"]
    assert daemon.get("/health") == {"status": "ok"}


def test_upstream_path_confined(daemon: Daemon) -> None:
    import urllib.error
    import urllib.request

    for bad in ("/upstream/smollm2/%2e%2e/%2e%2e/etc/passwd", "/upstream/smollm2/a%5c..%5cb"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(daemon.base_url + bad, timeout=30)
        assert e.value.code in (400, 404)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(daemon.base_url + "/upstream/no-such-model/props", timeout=30)
    assert e.value.code == 404
