"""Serving: an OpenAI-compatible HTTP API and a chat page (`septet serve`)."""

from .http import SeptetServer
from .openai import Request, RequestError, parse_chat, parse_completion
from .scheduler import Job, Scheduler

__all__ = ["SeptetServer", "Scheduler", "Job", "Request", "RequestError", "parse_chat", "parse_completion"]
