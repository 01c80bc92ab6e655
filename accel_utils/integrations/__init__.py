"""Integrations with other libraries; import the submodule you need (each is imported lazily)."""
