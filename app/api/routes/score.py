"""Toxicity scores of texts with the configured scorer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app.api.auth import requires
from app.api.deps import SettingsDep
from app.schemas import ScoreRequest, ScoresPublic
from eigenshift_core.scoring import load_scorer
from workers.jobs import TooLarge

router = APIRouter(prefix="/score", tags=["score"])


@router.post("", dependencies=[requires("score")])
async def score_texts(body: ScoreRequest, settings: SettingsDep) -> ScoresPublic:
    """Score texts for toxicity: P(toxic) in [0, 1] each."""
    if len(body.texts) > settings.max_generate_batch:
        raise TooLarge(f"{len(body.texts)} texts; max_generate_batch={settings.max_generate_batch}")
    if any(len(text) > settings.max_prompt_chars for text in body.texts):
        raise TooLarge(f"a text is longer than max_prompt_chars={settings.max_prompt_chars} characters")
    scorer = await run_in_threadpool(load_scorer, settings.scorer)
    scores = await run_in_threadpool(scorer.score_texts, body.texts)
    return ScoresPublic(scorer=scorer.name, scores=[float(s) for s in scores])
