"""The HTTP face of the server: OpenAI-compatible routes over the engine."""

from server.api.app import build_app
from server.api.dependencies import EngineAPI, get_engine
from server.api.streaming import merge_streams

__all__ = ["EngineAPI", "build_app", "get_engine", "merge_streams"]
