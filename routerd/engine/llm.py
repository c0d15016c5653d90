"""The one `llama_cpp.Llama` a worker serves, with a per-token hook.

`EngineLlama.generate` wraps the library's token generator: every sampled token is
counted in the current `GenerationControl`, and generation stops within one token once
the control is cancelled (the client went away). Everything here runs in the
generating thread, under the runner's lock: `llama_cpp.Llama` is not thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Sequence

import llama_cpp
from llama_cpp import Llama

from routerd.engine.options import EngineOptions
from routerd.engine.stats import GenerationControl

_POOLING = {
    "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
    "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
    "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
    "none": llama_cpp.LLAMA_POOLING_TYPE_NONE,
}


@dataclass(frozen=True)
class ModelInfo:
    path: str
    n_ctx: int
    n_ctx_train: int
    n_embd: int
    n_vocab: int
    n_params: int
    size: int
    chat_template: str
    pooling: str


class EngineLlama(Llama):
    """A Llama whose token loop reports to (and can be stopped by) a GenerationControl."""

    control: GenerationControl | None = None

    def generate(self, tokens: Sequence[int], *args: Any,
                 **kwargs: Any) -> Generator[int, Any, None]:
        control = self.control
        if control is None:
            yield from super().generate(tokens, *args, **kwargs)
            return
        prompt = list(tokens)
        control.on_prompt(len(prompt), self._cached_prefix(prompt))
        inner = super().generate(prompt, *args, **kwargs)
        try:
            for token in inner:
                is_eog = bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, token))
                if not control.on_token(is_eog):
                    return
                yield token
        finally:
            inner.close()

    def _cached_prefix(self, prompt: list[int]) -> int:
        """How much of the prompt `Llama.generate` will reuse from the KV cache."""
        if self.n_tokens == 0 or not prompt:
            return 0
        prefix = Llama.longest_token_prefix(self._input_ids.tolist(), prompt)
        if prefix == len(prompt) and self.n_tokens == len(prompt) and not self._requires_eval:
            return prefix
        return min(prefix, len(prompt) - 1)

    def embed_texts(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Pooled, L2-normalised embeddings (what llama-server's /v1/embeddings returns).

        The context was built with embeddings on (llama-cpp-python sizes its sequences
        then) and switched off for generation; it is switched on only around this call,
        so generation does not compute every prompt token's output.
        """
        llama_cpp.llama_set_embeddings(self.ctx, True)
        try:
            vectors, n_tokens = self.embed(texts, normalize=True, return_count=True)
        finally:
            llama_cpp.llama_set_embeddings(self.ctx, False)
        return vectors, n_tokens

    def info(self, pooling: str) -> ModelInfo:
        model = self.model
        return ModelInfo(
            path=self.model_path,
            n_ctx=self.n_ctx(),
            n_ctx_train=int(llama_cpp.llama_model_n_ctx_train(model)),
            n_embd=self.n_embd(),
            n_vocab=self.n_vocab(),
            n_params=int(llama_cpp.llama_model_n_params(model)),
            size=int(llama_cpp.llama_model_size(model)),
            chat_template=self.metadata.get("tokenizer.chat_template", ""),
            pooling=pooling,
        )


CTX_PAD = 256


def padded_ctx(ctx_size: int) -> int:
    """llama.cpp rounds n_ctx up to a multiple of 256, but llama-cpp-python sizes its
    token buffer with the number asked for: ask for the rounded size (0 = the model's)."""
    return -(-ctx_size // CTX_PAD) * CTX_PAD


def load_llama(opts: EngineOptions) -> EngineLlama:
    """Load the model (seconds to minutes; call from a thread). Raises on failure."""
    kwargs: dict[str, Any] = {
        "n_ctx": padded_ctx(opts.ctx_size),
        "n_gpu_layers": opts.n_gpu_layers,
        "n_batch": opts.batch_size,
        "embedding": opts.embeddings,
        "flash_attn": opts.flash_attn,
        "verbose": False,
    }
    if opts.threads:
        kwargs["n_threads"] = opts.threads
    if opts.threads_batch or opts.threads:
        kwargs["n_threads_batch"] = opts.threads_batch or opts.threads
    if opts.tensor_split:
        kwargs["tensor_split"] = list(opts.tensor_split)
        kwargs["main_gpu"] = opts.main_gpu
    if opts.embeddings:
        kwargs["pooling_type"] = _POOLING[opts.pooling]
    llm = EngineLlama(opts.model, **kwargs)
    if opts.embeddings:
        llama_cpp.llama_set_embeddings(llm.ctx, False)
    return llm
