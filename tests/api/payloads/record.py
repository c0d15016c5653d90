"""Re-record the engine payloads the translator tests replay: llama-server's own
/v1/chat/completions answers for SmolLM2, fetched through routerd's byte-exact
/upstream/<model>/ relay. Run: .venv/bin/python -m tests.api.payloads.record"""

from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path

from tests.conftest import MODEL, Daemon

HERE = Path(__file__).parent
ASK = {"messages": [{"role": "user", "content": "Who was the first man on the moon?"}],
       "temperature": 0, "max_tokens": 24, "seed": 1}


def post(d: Daemon, body: dict) -> bytes:
    req = urllib.request.Request(d.base_url + "/upstream/smollm2/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        d = Daemon({"models": {"smollm2": {"model": str(MODEL), "backend": "llama-server",
                                           "ctx_size": 2048}}}, Path(work))
        try:
            reply = json.loads(post(d, ASK))
            (HERE / "chat_reply.json").write_text(json.dumps(reply, indent=1) + "\n")
            stream = post(d, {**ASK, "stream": True, "stream_options": {"include_usage": True}})
            (HERE / "chat_stream.sse").write_bytes(stream)
            schema = {"type": "object", "properties": {"city": {"type": "string"}},
                      "required": ["city"]}
            forced = json.loads(post(d, {**ASK, "max_tokens": 48, "response_format": {
                "type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}}))
            (HERE / "chat_json_schema.json").write_text(json.dumps(forced, indent=1) + "\n")
        finally:
            d.stop()


if __name__ == "__main__":
    main()
