"""Generation from the served model, with the intervention toggled per prompt as an lm_head hook."""

from __future__ import annotations

import asyncio
import random
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from app.api.auth import key_name, requires
from app.api.deps import MetricsDep, ServerDep, ServiceDep, SettingsDep
from app.api.errors import Problem
from app.schemas import GenerateBatch, GenerateItem, Generation, GenerationsPublic
from app.serving import GenerationRequest, ModelServer
from eigenshift_core.errors import InputError
from eigenshift_core.intervention import Intervention
from eigenshift_core.scoring import load_scorer
from workers.interventions import InterventionNotFound
from workers.jobs import TooLarge

router = APIRouter(prefix="/generate", tags=["generate"])


async def _generate(items: list[GenerateItem], score: bool, key: str, settings: SettingsDep, service: ServiceDep,
                    server: ServerDep, metrics: MetricsDep) -> GenerationsPublic:
    if len(items) > settings.max_generate_batch:
        raise TooLarge(f"{len(items)} prompts in one request; max_generate_batch={settings.max_generate_batch}")
    for item in items:
        if len(item.prompt) > settings.max_prompt_chars:
            raise TooLarge(f"a prompt is longer than max_prompt_chars={settings.max_prompt_chars} characters")
        if item.max_new_tokens > settings.max_new_tokens_limit:
            raise InputError(f"max_new_tokens is over max_new_tokens_limit={settings.max_new_tokens_limit}", field="max_new_tokens")
    chosen = [await run_in_threadpool(_intervention_id, item, settings.model, service) for item in items]
    resolved: dict[str, Intervention] = {}
    for intervention_id in {i for i in chosen if i is not None}:
        resolved[intervention_id] = await run_in_threadpool(load_intervention, server, intervention_id)
    seeds = [item.seed if item.seed is not None else random.randrange(2**31) for item in items]
    requests = [GenerationRequest(item.prompt, item.max_new_tokens, item.temperature, item.top_p, seed,
                                  resolved[i] if i else None) for item, i, seed in zip(items, chosen, seeds, strict=True)]
    try:
        outputs = await asyncio.wait_for(server.batcher.generate(requests, key), timeout=settings.request_timeout_s)
    except TimeoutError:
        raise Problem(504, "generation took longer than the request timeout", slug="generation-timeout") from None
    for item, output in zip(items, outputs, strict=True):
        metrics.tokens.labels(str(item.detox).lower()).inc(len(output.token_ids))
    scores: list[float | None] = [None] * len(items)
    if score:
        scorer = await run_in_threadpool(load_scorer, settings.scorer)
        scores = list(await run_in_threadpool(scorer.score_texts, [o.text for o in outputs]))
    data = [Generation(prompt=item.prompt, text=o.text, token_ids=o.token_ids, logprobs=o.logprobs,
                       finish_reason=o.finish_reason, detox=i is not None, intervention=i, seed=seed, toxicity=s)
            for item, o, i, seed, s in zip(items, outputs, chosen, seeds, scores, strict=True)]
    return GenerationsPublic(model=settings.model, data=data)


def _intervention_id(item: GenerateItem, model: str, service: ServiceDep) -> str | None:
    if not item.detox:
        return None
    chosen = item.intervention or service.interventions.active_id(model)
    if chosen is None:
        raise InputError(f"no intervention is active for model {model!r}: activate one or name one", field="intervention")
    return chosen


def load_intervention(server: ModelServer, intervention_id: str) -> Intervention:
    """The server's copy of an intervention; an unknown id is a 422 naming `intervention`."""
    try:
        return server.intervention(intervention_id)
    except InterventionNotFound:
        raise InputError(f"no intervention {intervention_id!r}", field="intervention") from None


@router.get("", dependencies=[requires("generate")])
async def generate_text(
    request: Request, settings: SettingsDep, service: ServiceDep, server: ServerDep, metrics: MetricsDep,
    prompt: Annotated[str, Query(min_length=1, description="text to continue")],
    detox: bool = True,
    intervention: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = None,
    max_new_tokens: Annotated[int, Query(ge=1)] = 32,
    temperature: Annotated[float, Query(ge=0, le=10)] = 0.0,
    top_p: Annotated[float, Query(gt=0, le=1)] = 1.0,
    seed: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
    score: bool = False,
) -> GenerationsPublic:
    """Continue one prompt, detoxified or not."""
    item = GenerateItem(prompt=prompt, detox=detox, intervention=intervention, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed)
    return await _generate([item], score, key_name(request), settings, service, server, metrics)


@router.post("", dependencies=[requires("generate")])
async def generate_batch(request: Request, body: GenerateBatch, settings: SettingsDep, service: ServiceDep,
                         server: ServerDep, metrics: MetricsDep) -> GenerationsPublic:
    """Continue several prompts, each with its own detox setting and sampling."""
    return await _generate(body.items, body.score, key_name(request), settings, service, server, metrics)
