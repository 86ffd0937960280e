"""What a caller may see and change. Names form one global namespace (adapters, aliases, experiments);
each name has an owner (server/registry/namespace.py). A tenant sees its own names and public ones,
changes only its own, and gets for a name it may not see exactly the answer a name that does not exist
gets. Admins see and change everything. The checks answer from the namespace's in-memory copy, so the
request path asks no database."""

from server.experiments.errors import ExperimentNotFoundError
from server.registry.errors import AdapterNotFoundError, InvalidNameError
from server.registry.names import parse_model_ref
from server.registry.namespace import Namespace
from server.tenancy.errors import PermissionDeniedError
from server.tenancy.keys import Principal


class Access:
    def __init__(self, names: Namespace, base_name: str):
        self.names = names
        self._base_name = base_name

    def can_see(self, who: Principal, name: str) -> bool:
        if who.is_admin or name == self._base_name:
            return True
        entry = self.names.get(name)
        return entry is not None and (entry.tenant == who.tenant or entry.public)

    def owns(self, who: Principal, name: str) -> bool:
        if who.is_admin:
            return True
        entry = self.names.get(name)
        return entry is not None and entry.tenant == who.tenant

    def visible_names(self, who: Principal) -> set[str] | None:
        """The names a caller may see; None for all of them. Blocking (a database read)."""
        return None if who.is_admin else self.names.visible_to(who.tenant) | {self._base_name}

    def owned_names(self, who: Principal) -> set[str] | None:
        """Blocking (a database read)."""
        return None if who.is_admin else self.names.owned_by(who.tenant)

    # ---- checks that raise the answer a missing name gets --------------------------------------

    def see_model(self, who: Principal, ref: str) -> None:
        """An adapter or alias reference (`name`, `name@version`) the caller may use."""
        name = _name_of(ref)
        if name is not None and not self.can_see(who, name):
            raise AdapterNotFoundError(f"adapter {ref!r} not found")

    def change_model(self, who: Principal, ref: str) -> None:
        """An adapter or alias the caller may change: its own (a public one of others: 403)."""
        self.see_model(who, ref)
        name = _name_of(ref)
        if name is not None and not self.owns(who, name):
            raise PermissionDeniedError(f"{ref!r} is public but not yours: only its owner may change it")

    def see_alias(self, who: Principal, alias: str) -> None:
        if not self.owns(who, alias):
            raise AdapterNotFoundError(f"alias {alias!r} not found")

    def see_experiment(self, who: Principal, name: str) -> None:
        if not self.owns(who, name):
            raise ExperimentNotFoundError(f"experiment {name!r} not found")


def _name_of(ref: str) -> str | None:
    try:
        return parse_model_ref(ref).name
    except InvalidNameError:
        return None  # malformed: the resolver refuses it with its own message
