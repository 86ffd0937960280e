"""A/B experiments over HTTP: define and steer them, take feedback, read results, promote the winner."""

import asyncio
from dataclasses import asdict
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from server.api.audit import audit
from server.api.auth import caller
from server.api.state import AppState, app_state
from server.experiments.model import AssignmentKey, Experiment, Status, Variant
from server.experiments.results import Results, VariantResult
from server.experiments.service import DEFAULT_MIN_SAMPLES, MAX_ABS_SCORE, MAX_MIN_SAMPLES

router = APIRouter(tags=["experiments"])

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("wieght") must not pass silently


class VariantBody(_Body):
    name: str
    adapter: str = Field(description="adapter name (its newest version), name@version, alias, or the base's name; "
                                     "pinned to one version at creation")
    weight: Weight = Field(1.0, description="relative share of the traffic")
    control: bool = Field(False, description="compare the others against this one (default: the first)")


class CreateExperimentBody(_Body):
    name: str
    description: str = ""
    variants: list[VariantBody] = Field(min_length=2)
    status: Status = Field(Status.DRAFT, description="draft or running")
    assignment_key: AssignmentKey = Field("user", description="user: the `user` field, else the X-Experiment-Key "
                                                              "header; header: that header only; random")
    min_samples: int = Field(DEFAULT_MIN_SAMPLES, ge=2, le=MAX_MIN_SAMPLES,
                             description="scored requests per variant before a verdict")


class PromoteBody(_Body):
    alias: str
    variant: str | None = Field(None, description="default: the variant the results name the winner")


class UpdateExperimentBody(_Body):
    status: Status | None = None
    weights: dict[str, Weight] | None = Field(None, description="variant name -> new relative weight")
    promote: PromoteBody | None = None


class FeedbackBody(_Body):
    request_id: str = Field(min_length=1, max_length=256, description="the request id or the response id")
    score: StrictBool | Annotated[float, Field(allow_inf_nan=False, ge=-MAX_ABS_SCORE, le=MAX_ABS_SCORE)] = Field(
        description="binary (true/false, 1/0) or numeric within ±1e9; higher is better")


@router.post("/v1/experiments", status_code=201)
async def create_experiment(request: Request, body: CreateExperimentBody) -> dict:
    state, who = app_state(request), caller(request)
    for v in body.variants:
        state.access.see_model(who, v.adapter)
    variants = [Variant(v.name, v.adapter, v.weight, v.control) for v in body.variants]
    experiment = await asyncio.to_thread(lambda: state.experiments.create(
        body.name, variants, status=body.status, description=body.description,
        assignment_key=body.assignment_key, min_samples=body.min_samples, tenant=who.tenant,
    ))
    await audit(request, "experiment.create", experiment.name, status=experiment.status.value)
    return _experiment_json(experiment, state.models.base_name)


def _own(request: Request, state: AppState, name: str) -> None:
    state.access.see_experiment(caller(request), name)


@router.get("/v1/experiments")
async def list_experiments(request: Request) -> dict:
    state = app_state(request)
    owned = await asyncio.to_thread(state.access.owned_names, caller(request))
    experiments = [e for e in await asyncio.to_thread(state.experiments.all) if owned is None or e.name in owned]
    return {"object": "list", "data": [_experiment_json(e, state.models.base_name) for e in experiments]}


@router.get("/v1/experiments/{name}")
async def get_experiment(request: Request, name: str) -> dict:
    state = app_state(request)
    _own(request, state, name)
    return _experiment_json(await asyncio.to_thread(state.experiments.get, name), state.models.base_name)


@router.patch("/v1/experiments/{name}")
async def update_experiment(request: Request, name: str, body: UpdateExperimentBody) -> dict:
    """Change the status and/or weights; with `promote`, also point an alias at the winner (e.g. when
    stopping). Nothing changes unless every part is accepted."""
    state, who = app_state(request), caller(request)
    _own(request, state, name)
    promote = body.promote
    experiment = await asyncio.to_thread(lambda: state.experiments.update(
        name, status=body.status, weights=body.weights, tenant=who.tenant,
        promote_alias=promote.alias if promote else None, promote_variant=promote.variant if promote else None,
    ))
    await audit(request, "experiment.update", name, **body.model_dump(mode="json", exclude_none=True))
    return _experiment_json(experiment, state.models.base_name)


@router.post("/v1/experiments/{name}/promote")
async def promote_experiment(request: Request, name: str, body: PromoteBody) -> dict:
    """Point an alias at the winning variant's adapter version (or at the named variant's)."""
    state, who = app_state(request), caller(request)
    _own(request, state, name)
    experiment = await asyncio.to_thread(state.experiments.promote, name, body.alias, body.variant, who.tenant)
    await audit(request, "experiment.promote", name, alias=body.alias, variant=body.variant)
    return _experiment_json(experiment, state.models.base_name)


@router.delete("/v1/experiments/{name}")
async def delete_experiment(request: Request, name: str) -> dict:
    """Delete an experiment with its records and results; its name becomes free."""
    state = app_state(request)
    _own(request, state, name)
    await asyncio.to_thread(state.experiments.delete, name)
    await audit(request, "experiment.delete", name)
    return {"deleted": name}


@router.get("/v1/experiments/{name}/results")
async def experiment_results(request: Request, name: str) -> dict:
    state = app_state(request)
    _own(request, state, name)
    return _results_json(await asyncio.to_thread(state.experiments.results, name), state.models.base_name)


@router.post("/v1/feedback", status_code=201)
async def feedback(request: Request, body: FeedbackBody) -> dict:
    """Score the response of one experiment request, once."""
    state, who = app_state(request), caller(request)
    allowed = None if who.is_admin else (lambda experiment: state.access.owns(who, experiment))
    assignment = await asyncio.to_thread(state.experiments.feedback, body.request_id, float(body.score),
                                         who.tenant, allowed)
    return {"request_id": assignment.request_id, "experiment": assignment.experiment,
            "variant": assignment.variant, "score": float(body.score)}


def _experiment_json(experiment: Experiment, base_name: str) -> dict:
    total = sum(v.weight for v in experiment.variants)
    control = experiment.control
    promotion = experiment.promotion
    return {
        "object": "experiment",
        "name": experiment.name,
        "description": experiment.description,
        "status": experiment.status.value,
        "variants": [
            {"name": v.name, "adapter": v.adapter or base_name, "weight": v.weight, "share": v.weight / total,
             "control": v is control}
            for v in experiment.variants
        ],
        "assignment_key": experiment.assignment_key,
        "min_samples": experiment.min_samples,
        "created": _timestamp(experiment.created_at),
        "updated": _timestamp(experiment.updated_at),
        "started": _timestamp(experiment.started_at),
        "stopped": _timestamp(experiment.stopped_at),
        "promotion": {**asdict(promotion), "at": _timestamp(promotion.at)} if promotion else None,
    }


def _results_json(results: Results, base_name: str) -> dict:
    return {
        "object": "experiment.results",
        "experiment": results.experiment,
        "status": results.status,
        "score_type": results.score_type,
        "alpha": results.alpha,
        "min_samples": results.min_samples,
        "verdict": asdict(results.verdict),
        "variants": [_variant_result_json(v, base_name) for v in results.variants],
    }


def _variant_result_json(result: VariantResult, base_name: str) -> dict:
    feedback = result.feedback
    return {
        "name": result.name,
        "adapter": result.adapter or base_name,
        "weight": result.weight,
        "control": result.control,
        "requests": result.requests,
        "errors": result.errors,
        "errors_by_code": result.errors_by_code,
        "output_tokens": result.output_tokens,
        "latency_seconds": {"ttft": result.ttft, "total": result.latency},
        "feedback": {"count": feedback.n, "mean": feedback.mean,
                     "ci95": [feedback.ci_low, feedback.ci_high] if feedback.ci_low is not None else None},
        "comparison": asdict(result.comparison) if result.comparison else None,
    }


def _timestamp(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None
