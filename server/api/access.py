"""What a caller may see and change. Names form one global namespace (adapters, aliases, experiments);
each name has an owner (see server/tenancy/ownership.py). A tenant sees its own names and public ones,
changes only its own, and gets for a name it may not see exactly the answer a name that does not exist
gets. Admins see and change everything."""

from collections.abc import Callable

from server.experiments.errors import ExperimentNotFoundError
from server.registry.errors import AdapterNotFoundError, InvalidNameError, NameConflictError
from server.registry.names import check_name, parse_model_ref
from server.tenancy.errors import PermissionDeniedError
from server.tenancy.keys import Principal
from server.tenancy.ownership import OwnershipStore


class Access:
    def __init__(self, ownership: OwnershipStore, taken: Callable[[str], bool], base_name: str):
        """`taken(name)`: whether the name is in use (an adapter, deleted or not, an alias, an experiment)."""
        self.ownership = ownership
        self._taken = taken
        self._base_name = base_name

    def can_see(self, who: Principal, name: str) -> bool:
        if who.is_admin or name == self._base_name:
            return True
        owner = self.ownership.owner(name)
        return owner is not None and (owner.tenant == who.tenant or owner.public)

    def owns(self, who: Principal, name: str) -> bool:
        if who.is_admin:
            return True
        owner = self.ownership.owner(name)
        return owner is not None and owner.tenant == who.tenant

    def visible_names(self, who: Principal) -> set[str] | None:
        """The names a caller may see; None for all of them."""
        return None if who.is_admin else self.ownership.visible_names(who.tenant) | {self._base_name}

    def owned_names(self, who: Principal) -> set[str] | None:
        return None if who.is_admin else self.ownership.owned_names(who.tenant)

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

    # ---- creating names ------------------------------------------------------------------------

    def claim(self, who: Principal, name: str) -> bool:
        """Before a tenant creates something under `name`: make the name its own. True if this call
        claimed it (release it if the creation then fails). A name owned by someone else, or in use
        by the admins, answers as a conflict that does not say whose it is."""
        if who.is_admin:
            return False
        check_name(name)
        owner = self.ownership.owner(name)
        if owner is not None and owner.tenant == who.tenant:
            return False
        free = owner is None and name != self._base_name and not self._taken(name)
        if free and self.ownership.claim(name, who.tenant):
            return True
        raise NameConflictError(f"name {name!r} is not available")

    def release(self, who: Principal, name: str) -> None:
        if not who.is_admin:
            self.ownership.release(name, who.tenant)


def _name_of(ref: str) -> str | None:
    try:
        return parse_model_ref(ref).name
    except InvalidNameError:
        return None  # malformed: the resolver refuses it with its own message
