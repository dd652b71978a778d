"""Per-token log-probabilities of the target, for ``logprobs`` and ``echo`` on /v1/completions.

They come from forwards the engine runs anyway, never from an extra one: a prompt's rows from
its prefill forward (all rows kept instead of the last), each generated token's row from the
verification forward that committed it (the rows the ``Teacher`` keeps for the training
record, with the same log-sum-exp and top-k).

What they are: the raw target distribution, ``log_softmax`` of the target's logits at
temperature 1, before temperature, top-k or top-p shape the sampling distribution. That is
what vLLM and OpenAI report and what a loglikelihood evaluation (lm-eval) needs: the score
of a continuation must not depend on the sampling settings of the request that carried it.
Computed in float32 from the float32 logits, so a token's log-prob is exact (not the
training record's float16) even when the token is outside the top N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 5  # OpenAI's limit on the legacy completions ``logprobs``


@dataclass
class TokenLogprobs:
    """Log-probabilities of a run of tokens, one entry per token.

    ``logprobs[i]`` is log p(token_ids[i] | the tokens before it); ``top_ids[i]`` /
    ``top_logprobs[i]`` the N likeliest tokens at that position, best first. An entry with no
    context before it (a prompt's first token) has None in all three.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_ids: list[list[int] | None]
    top_logprobs: list[list[float] | None]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __add__(self, other: TokenLogprobs) -> TokenLogprobs:
        return TokenLogprobs(self.token_ids + other.token_ids, self.logprobs + other.logprobs,
                             self.top_ids + other.top_ids, self.top_logprobs + other.top_logprobs)

    @classmethod
    def unconditioned(cls, token_id: int) -> TokenLogprobs:
        """A first token: nothing precedes it, so it has no log-prob."""
        return cls([token_id], [None], [None], [None])

    @classmethod
    def empty(cls) -> TokenLogprobs:
        return cls([], [], [], [])


class LogprobRows:
    """Collects TokenLogprobs from target logits and the token chosen at each row."""

    def __init__(self, top: int):
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        self.top = top
        self._ids: list[torch.Tensor] = []
        self._chosen: list[torch.Tensor] = []
        self._top_ids: list[torch.Tensor] = []
        self._top_logprobs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, tokens: torch.Tensor | list[int], lse: torch.Tensor | None = None,
            top: torch.return_types.topk | None = None) -> None:
        """logits: [n, V] raw target logits (fp32); tokens: [n], the token chosen at each row.

        ``lse`` ([n]) and ``top`` (a sorted topk of ``logits``, any k) may be passed when the caller
        has them already (the Teacher does); a topk narrower than ``self.top`` is recomputed.
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=logits.device)  # [n]
        lse = logits.logsumexp(-1) if lse is None else lse  # [n]
        self._ids.append(tokens.cpu())
        self._chosen.append((logits.gather(-1, tokens[:, None])[:, 0] - lse).float().cpu())
        if top is None or top.values.shape[-1] < self.top:
            top = torch.topk(logits, min(self.top, logits.shape[-1]), dim=-1)
        self._top_ids.append(top.indices[:, : self.top].cpu())
        self._top_logprobs.append((top.values[:, : self.top] - lse[:, None]).float().cpu())

    def result(self, n: int | None = None) -> TokenLogprobs:
        """The first ``n`` rows collected (all when None)."""
        if not self._ids:
            return TokenLogprobs.empty()
        cut = slice(None, n)
        return TokenLogprobs(torch.cat(self._ids)[cut].tolist(), torch.cat(self._chosen)[cut].tolist(),
                             torch.cat(self._top_ids)[cut].tolist(), torch.cat(self._top_logprobs)[cut].tolist())
