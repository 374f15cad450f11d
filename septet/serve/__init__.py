"""Serving: an OpenAI-compatible HTTP API and a chat page (`septet serve`)."""

from .http import SeptetServer
from .openai import Generation, Request, RequestError, parse_chat, parse_completion

__all__ = ["SeptetServer", "Generation", "Request", "RequestError", "parse_chat", "parse_completion"]
