"""Adapters as data: content-addressed blobs on disk, a metadata catalogue, and a host-memory cache."""
