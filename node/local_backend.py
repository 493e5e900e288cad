"""A CompletionBackend that runs a local engine directly (no network, no payment).

Used by ``cocoon-node ask --local``, by API tests and as the "bare engine"
baseline of ``bench/e2e.py``.  The network client backend has the same shape.
"""

from __future__ import annotations

import secrets

from inference.engine import Engine, ModelInfo, UnknownModel
from inference.messages import FinalChunk, GenerateRequest, TokenChunk

from .completion import Completed, CompletionRequest, EventSender, ModelCard, TextDelta, WorkerUse

__all__ = ["EngineBackend", "to_generate_request"]


def to_generate_request(req: CompletionRequest, request_id: str | None = None) -> GenerateRequest:
    """The API request as the engine's (and the wire's) generation request."""
    return GenerateRequest(
        request_id=request_id or secrets.token_hex(8),
        model=req.model,
        max_tokens=req.max_tokens,
        prompt=req.prompt,
        messages=req.messages,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop,
    )


class EngineBackend:
    """Completions from one local engine, priced at ``price_completion`` nanoTON per token."""

    def __init__(
        self,
        engine: Engine,
        info: ModelInfo,
        *,
        name: str = "local",
        price_prompt: int = 0,
        price_completion: int = 0,
    ) -> None:
        self.engine = engine
        self.info = info
        self.name = name
        self.price_prompt = price_prompt
        self.price_completion = price_completion

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.info.model_id, workers=1, min_price_completion=self.price_completion)]

    async def complete(self, request: CompletionRequest, events: EventSender) -> None:
        if request.model != self.info.model_id:
            raise UnknownModel(f"model {request.model!r} is not served here (try {self.info.model_id!r})")
        gen = self.engine.generate_stream(to_generate_request(request))
        try:
            async for chunk in gen:
                if isinstance(chunk, TokenChunk):
                    if chunk.text or chunk.token_ids:
                        await events.send(TextDelta(chunk.text, len(chunk.token_ids)))
                elif isinstance(chunk, FinalChunk):
                    if chunk.text or chunk.token_ids:
                        await events.send(TextDelta(chunk.text, len(chunk.token_ids)))
                    cost = (
                        chunk.prompt_tokens * self.price_prompt
                        + chunk.completion_tokens * self.price_completion
                    )
                    await events.send(
                        Completed(
                            finish_reason=chunk.finish_reason,
                            prompt_tokens=chunk.prompt_tokens,
                            completion_tokens=chunk.completion_tokens,
                            cost_nanoton=cost,
                            workers=(WorkerUse(self.name, "local", chunk.completion_tokens, cost),),
                            ttft_s=chunk.ttft_s,
                            worker_decode_tok_s=chunk.decode_tok_per_s,
                            worker_ttft_s=chunk.ttft_s,
                        )
                    )
        finally:
            await gen.aclose()
