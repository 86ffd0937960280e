"""What a request's `model` names: the base, an adapter (`name`, `name@version`) or an alias."""

import asyncio
import time

from server.api.inference import Target
from server.api.metrics import Metrics
from server.api.schemas import ModelCard
from server.registry.registry import AdapterRegistry


class ModelResolver:
    def __init__(self, base_name: str, registry: AdapterRegistry, metrics: Metrics, created: int):
        self.base_name = base_name
        self._registry = registry
        self._metrics = metrics
        self._created = created

    async def resolve(self, model: str) -> Target:
        """The base or a host-resident adapter; a cold adapter is read from disk on a worker thread, so
        neither the event loop nor the engine's step waits for it."""
        if model == self.base_name:
            return Target(model, None, self.base_name)
        record = self._registry.resolve(model)
        cold = self._registry.tier_of(record.key) == "disk"
        started = time.perf_counter()
        adapter = await asyncio.to_thread(self._registry.load, record)
        if cold:
            self._metrics.adapter_loads.labels("host").observe(time.perf_counter() - started)
        return Target(model, adapter, record.key)

    def cards(self) -> list[ModelCard]:
        """The base first, then every live adapter (by name, newest version) and alias."""
        base = ModelCard(id=self.base_name, created=self._created, root=self.base_name)
        adapters = [
            ModelCard(id=record.name, created=int(record.created_at.timestamp()), root=record.key,
                      parent=self.base_name)
            for record in self._registry.latest_versions()
        ]
        aliases = [
            ModelCard(id=alias.alias, created=int(alias.updated_at.timestamp()), root=alias.target,
                      parent=self.base_name)
            for alias in self._registry.list_aliases()
        ]
        return [base, *adapters, *aliases]
