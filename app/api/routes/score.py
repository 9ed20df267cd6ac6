"""Toxicity scores of texts with the configured scorer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.api.deps import SettingsDep
from app.schemas import ScoreRequest, ScoresPublic
from eigenshift_core.scoring import load_scorer
from workers.jobs import TooLarge

router = APIRouter(prefix="/score", tags=["score"])


@router.post("")
async def score_texts(body: ScoreRequest, settings: SettingsDep) -> ScoresPublic:
    """Score texts for toxicity: P(toxic) in [0, 1] each."""
    if len(body.texts) > settings.max_generate_batch:
        raise TooLarge(f"{len(body.texts)} texts; at most {settings.max_generate_batch}")
    if any(len(text) > settings.max_prompt_chars for text in body.texts):
        raise TooLarge(f"a text is longer than {settings.max_prompt_chars} characters")
    scorer = await run_in_threadpool(load_scorer, settings.scorer)
    scores = await run_in_threadpool(scorer.score_texts, body.texts)
    return ScoresPublic(scorer=scorer.name, scores=[float(s) for s in scores])
