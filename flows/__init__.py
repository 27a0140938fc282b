"""Prefect flows: thin orchestration over anysat library functions."""
