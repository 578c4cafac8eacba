"""The HTTP server: an OpenAI-compatible API over the engine's scheduler and worker processes."""

from diffgen.entrypoints.http.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
