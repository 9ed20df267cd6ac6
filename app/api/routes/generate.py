"""Generation from the served model, with the intervention toggled per prompt as an lm_head hook."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from app.api.deps import GeneratorDep, MetricsDep, ServerDep, ServiceDep, SettingsDep
from app.api.errors import Problem
from app.schemas import GenerateBatch, GenerateItem, Generation, GenerationsPublic
from app.serving import GenerationRequest, ModelServer
from eigenshift_core.errors import InputError
from eigenshift_core.intervention import Intervention
from eigenshift_core.scoring import load_scorer
from workers.interventions import InterventionNotFound
from workers.job_service import JobService
from workers.jobs import TooLarge
from workers.owners import Caller
from workers.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/generate", tags=["generate"])


async def check_prompt_tokens(server: ModelServer, prompts: Sequence[str], max_new_tokens: Sequence[int],
                              settings: Settings, fields: Sequence[str]) -> list[int]:
    """Each prompt's length in tokens; a 413 naming its field when one is over `max_prompt_tokens` or leaves
    the model's context no room for its `max_new_tokens`. Checked before anything is queued."""
    counts = await run_in_threadpool(server.prompt_tokens, prompts)
    for count, new_tokens, field in zip(counts, max_new_tokens, fields, strict=True):
        limit = server.prompt_token_limit(new_tokens, settings.max_prompt_tokens)
        if count > limit:
            raise Problem(413, f"{field} is {count} tokens, over the limit of {limit} (max_prompt_tokens="
                               f"{settings.max_prompt_tokens}, and room in the model's context for {new_tokens} "
                               "new tokens)", field=field, slug="prompt-too-long")
    return counts


async def _generate(items: list[GenerateItem], score: bool, settings: SettingsDep, service: ServiceDep,
                    server: ServerDep, metrics: MetricsDep, fields: Sequence[str], caller: Caller) -> GenerationsPublic:
    key = caller.name or ""  # the batch's fair share is per API key
    if len(items) > settings.max_generate_batch:
        raise TooLarge(f"{len(items)} prompts in one request; max_generate_batch={settings.max_generate_batch}")
    for item in items:
        if len(item.prompt) > settings.max_prompt_chars:
            raise TooLarge(f"a prompt is longer than max_prompt_chars={settings.max_prompt_chars} characters")
        if item.max_new_tokens > settings.max_new_tokens_limit:
            raise InputError(f"max_new_tokens is over max_new_tokens_limit={settings.max_new_tokens_limit}", field="max_new_tokens")
    await check_prompt_tokens(server, [item.prompt for item in items], [item.max_new_tokens for item in items],
                              settings, fields)
    chosen = [await run_in_threadpool(_intervention_id, item, settings.model, service) for item in items]
    resolved: dict[str, Intervention] = {}
    for intervention_id in {i for i in chosen if i is not None}:
        resolved[intervention_id] = await run_in_threadpool(load_intervention, server, service, intervention_id, caller)
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


def load_intervention(server: ModelServer, service: JobService, intervention_id: str, caller: Caller) -> Intervention:
    """The server's copy of an intervention `caller` may use; an unknown id, or another key's, is a 422 naming
    `intervention`, and so is an artifact that fails its digest or the core's checks (logged)."""
    try:
        service.interventions.get(intervention_id, caller)
        return server.intervention(intervention_id)
    except InterventionNotFound:
        raise InputError(f"no intervention {intervention_id!r}", field="intervention") from None
    except InputError as error:
        log.warning("intervention %s refused: %s", intervention_id, error)
        raise


@router.get("")
async def generate_text(
    settings: SettingsDep, service: ServiceDep, server: ServerDep, metrics: MetricsDep, caller: GeneratorDep,
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
    return await _generate([item], score, settings, service, server, metrics, ["prompt"], caller)


@router.post("")
async def generate_batch(body: GenerateBatch, settings: SettingsDep, service: ServiceDep, server: ServerDep,
                         metrics: MetricsDep, caller: GeneratorDep) -> GenerationsPublic:
    """Continue several prompts, each with its own detox setting and sampling."""
    return await _generate(body.items, body.score, settings, service, server, metrics,
                           [f"items.{i}.prompt" for i in range(len(body.items))], caller)
