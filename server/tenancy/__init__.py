"""Tenants and API keys, who owns which name, and the audit log: data only, nothing here knows HTTP."""
