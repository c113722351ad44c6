"""The OpenAI-compatible HTTP API (FastAPI on uvicorn): `model` names an adapter or the base."""
