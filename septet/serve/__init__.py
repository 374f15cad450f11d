"""Serving: an OpenAI-compatible HTTP API and a chat page (`septet serve`)."""

from .http import SeptetServer
from .batcher import Batcher, Job
from .openai import Request, RequestError, parse_chat, parse_completion

__all__ = ["SeptetServer", "Batcher", "Job", "Request", "RequestError", "parse_chat", "parse_completion"]
