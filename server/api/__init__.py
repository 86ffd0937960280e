"""HTTP only: routes translate between HTTP and the engine, registry and experiments."""
