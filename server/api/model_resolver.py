"""What a request's `model` names: the base, an adapter (`name`, `name@version`), an alias, or an
experiment (which assigns the caller one of its variants)."""

import asyncio
import time
from dataclasses import asdict, replace

from server.api.access import Access
from server.api.inference import Target, refusal
from server.api.metrics import Metrics
from server.api.schemas import ModelCard
from server.engine.model_loader import BaseFootprint
from server.experiments.model import Caller, Experiment
from server.experiments.service import ExperimentService
from server.registry.registry import AdapterRegistry
from server.tenancy.keys import Principal


class ModelResolver:
    def __init__(self, base_name: str, registry: AdapterRegistry, metrics: Metrics, created: int,
                 experiments: ExperimentService, access: Access, footprint: BaseFootprint | None = None):
        self.base_name = base_name
        self._footprint = footprint
        self._registry = registry
        self._metrics = metrics
        self._created = created
        self._experiments = experiments
        self.access = access

    async def resolve(self, model: str, caller: Caller | None = None, principal: Principal | None = None) -> Target:
        """The base or a host-resident adapter; a cold adapter is read from disk on a worker thread, so
        neither the event loop nor the engine's step waits for it. With a caller (an inference request),
        an experiment's name resolves to the variant assigned to the caller, recorded under its request id;
        experiments are looked up before adapters and aliases. With a principal, only what it may see
        resolves; anything else answers as a name that does not exist."""
        visible = principal is None or self.access.can_see(principal, model)
        experiment = self._experiments.find(model) if caller is not None and model != self.base_name else None
        if experiment is not None and visible:
            return await self._resolve_variant(experiment, caller)
        if principal is not None:
            self.access.see_model(principal, model)
        return await self._resolve_model(model)

    async def _resolve_variant(self, experiment: Experiment, caller: Caller) -> Target:
        assignment = await asyncio.to_thread(self._experiments.assign, experiment, caller)
        try:
            target = await self._resolve_model(assignment.adapter or self.base_name)
        except Exception as exc:  # e.g. the variant's adapter version was deleted: an error of that variant
            await self._experiments.record_outcome(assignment, refusal(exc))
            raise
        return replace(target, model=experiment.name, experiment=assignment)

    async def _resolve_model(self, model: str) -> Target:
        if model == self.base_name:
            return Target(model, None, self.base_name)
        record = self._registry.resolve(model)
        adapter = self._registry.cached(record)  # the usual case: no thread hop
        if adapter is None:
            started = time.perf_counter()
            adapter = await asyncio.to_thread(self._registry.read, record)
            self._metrics.adapter_loads.labels("host").observe(time.perf_counter() - started)
        return Target(model, adapter, record.key)

    def cards(self, visible: set[str] | None = None) -> list[ModelCard]:
        """The base first, then every live adapter (by name, newest version) and alias, among `visible`
        names when given."""
        base = ModelCard(id=self.base_name, created=self._created, root=self.base_name,
                         **(asdict(self._footprint) if self._footprint else {}))
        adapters = [
            ModelCard(id=record.name, created=int(record.created_at.timestamp()), root=record.key,
                      parent=self.base_name)
            for record in self._registry.latest_versions() if visible is None or record.name in visible
        ]
        aliases = [
            ModelCard(id=alias.alias, created=int(alias.updated_at.timestamp()), root=alias.target,
                      parent=self.base_name)
            for alias in self._registry.list_aliases() if visible is None or alias.alias in visible
        ]
        return [base, *adapters, *aliases]
