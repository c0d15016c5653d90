"""Jobs the runner executes in its thread, with the model lock held.

Each is a generator over the model: the runner forwards what it yields to the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from routerd.engine.runner import Job, Piece
from routerd.engine.stats import GenerationControl

if TYPE_CHECKING:
    from routerd.engine.llm import EngineLlama

CHAT = "create_chat_completion"
COMPLETION = "create_completion"


def finish_reason(chunk: dict[str, Any]) -> str | None:
    choices = chunk.get("choices") or [{}]
    reason = choices[0].get("finish_reason")
    return str(reason) if reason is not None else None


def generation(method: str, kwargs: dict[str, Any], stream: bool) -> Job[EngineLlama, Piece]:
    """A chat or text completion; with `stream`, one Piece per library chunk.

    The piece that carries the finish reason also carries the final TokenStats.
    """

    def job(llm: EngineLlama, control: GenerationControl) -> Iterator[Piece]:
        create = getattr(llm, method)
        llm.control = control
        try:
            if not stream:
                yield Piece(create(**kwargs, stream=False), control.snapshot())
                return
            chunks = create(**kwargs, stream=True)
            try:
                for chunk in chunks:
                    done = finish_reason(chunk) is not None
                    yield Piece(chunk, control.snapshot() if done else None)
            finally:
                chunks.close()
        finally:
            llm.control = None

    return job


def embedding(inputs: list[str | list[int]]) -> Job[EngineLlama, tuple[list[Any], int]]:
    """Pooled, normalised vectors for each input, and the tokens they took."""

    def job(llm: EngineLlama, control: GenerationControl) -> Iterator[tuple[list[Any], int]]:
        texts = [text if isinstance(text, str)
                 else llm.detokenize(text, special=True).decode("utf-8", "replace")
                 for text in inputs]
        yield llm.embed_texts(texts)

    return job
