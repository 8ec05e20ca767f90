"""The storage contract: one module per interface of ``storage.base``, every test run against each
backend in ``conftest.BACKENDS`` through ``storage.open_storage``."""
