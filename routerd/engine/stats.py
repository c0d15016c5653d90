"""Per-generation control and counters, shared by the generating thread and the loop.

The generating thread writes (`on_prompt`, `on_token`); the event loop only reads a
frozen `snapshot()` that travels with the last chunk, so no field is read while written.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TokenStats:
    """What llama-server reports as `timings` and `usage`, for one generation."""

    prompt_tokens: int = 0       # the whole prompt (usage.prompt_tokens)
    cached_tokens: int = 0       # prefix reused from the KV cache (timings.cache_n)
    predicted: int = 0           # tokens sampled, the end-of-generation token included
    prompt_ms: float = 0.0       # start of the job to the first sampled token
    predicted_ms: float = 0.0    # first sampled token to the last
    stopped_eos: bool = False    # the last sampled token was end-of-generation

    @property
    def prompt_evaluated(self) -> int:
        return max(self.prompt_tokens - self.cached_tokens, 0)

    def timings(self) -> dict[str, Any]:
        """llama-server's `timings` object."""
        prompt_n, predicted_n = self.prompt_evaluated, self.predicted
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_token_ms": _per_token(self.prompt_ms, prompt_n),
            "prompt_per_second": _per_second(self.prompt_ms, prompt_n),
            "predicted_n": predicted_n,
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_token_ms": _per_token(self.predicted_ms, predicted_n),
            "predicted_per_second": _per_second(self.predicted_ms, predicted_n),
        }

    def usage(self) -> dict[str, int]:
        """OpenAI's `usage` object (llama-server counts the end token as predicted, so do we)."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.predicted,
            "total_tokens": self.prompt_tokens + self.predicted,
        }


def _per_token(ms: float, n: int) -> float:
    return round(ms / n, 3) if n > 0 else 0.0


def _per_second(ms: float, n: int) -> float:
    return round(1000.0 * n / ms, 3) if ms > 0 and n > 0 else 0.0


class GenerationControl:
    """Cancellation flag plus counters for one generation.

    The client side calls `cancel()`; the generating thread calls `on_token()` once per
    sampled token and stops when it returns False.
    """

    def __init__(self) -> None:
        self._cancelled = threading.Event()
        self._stats = TokenStats()
        self._t_start = time.perf_counter()
        self._t_first: float | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def start(self) -> None:
        """The job got the model: prompt time counts from here, not from the queue."""
        self._t_start = time.perf_counter()

    def on_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._stats = replace(self._stats, prompt_tokens=prompt_tokens,
                              cached_tokens=cached_tokens)

    def on_token(self, is_eog: bool) -> bool:
        """Count one sampled token; False means: stop generating now."""
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
            prompt_ms, predicted_ms = (now - self._t_start) * 1000.0, 0.0
        else:
            prompt_ms = self._stats.prompt_ms
            predicted_ms = (now - self._t_first) * 1000.0
        self._stats = replace(self._stats, predicted=self._stats.predicted + 1,
                              prompt_ms=prompt_ms, predicted_ms=predicted_ms,
                              stopped_eos=is_eog)
        return not self._cancelled.is_set()

    def snapshot(self) -> TokenStats:
        return self._stats
