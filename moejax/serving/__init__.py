"""Serving: the engine, the OpenAI-compatible API, and a client-side load generator."""
