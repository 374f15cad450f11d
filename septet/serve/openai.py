"""The OpenAI-compatible request and response shapes, with no HTTP in them.

`parse_completion` / `parse_chat` check a request body and turn it into a `Request` (prompt
ids, Sampling, stop strings; septet.serve.scheduler runs it); `response` / `chunk` build the
JSON objects the OpenAI API returns (a whole completion, or one server-sent event of a stream).
Errors are `RequestError`, a one-line message naming the field and the fix, sent back as HTTP 400.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..api import LoadedModel
from ..chat_template import DEFAULT_TEMPLATE, render_chat
from ..errors import SeptetError
from ..generation_config import sampling_for
from ..inference import Sampling

MAX_STOPS = 4  # as the OpenAI API
# a field the request leaves out takes the model's recommended value (lm.generation_defaults,
# septet.generation_config), else the OpenAI API's default, here
FALLBACK = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


class RequestError(SeptetError):
    """A request the server refuses (HTTP 400); the message names the field."""


@dataclass
class Request:
    ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    chat: bool
    repetition_guard: bool = True  # end the reply once it loops (septet.inference.repetition)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise RequestError(f"field '{key}' must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise RequestError(f"field '{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _common(body: dict, lm: LoadedModel, ids: list[int], chat: bool, default_max: int,
            compile: bool) -> Request:
    unsupported = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": None,
                   "top_logprobs": None, "echo": False, "suffix": None, "logit_bias": None, "tools": None}
    for key, neutral in unsupported.items():
        v = body.get(key)
        if not (v is None or v is False or v == neutral or v == {} or v == []):
            raise RequestError(f"field '{key}' is not supported by septet's server; leave it out "
                               f"(or set it to {neutral!r})")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError("field 'stream' must be true or false")
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"field 'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them")
    context = lm.model.config.context
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_new = _int(body, key, None, 1, context)
    if max_new is None:  # not asked: the default, as far as the context allows
        max_new = max(1, min(default_max, context - len(ids)))
    if len(ids) + max_new > context:
        raise RequestError(f"the prompt is {len(ids)} tokens and '{key}' {max_new}: more than the model's "
                           f"context of {context}; shorten the prompt or lower '{key}'")
    d = sampling_for(lm, FALLBACK)
    sampling = Sampling(max_new_tokens=max_new,
                        temperature=_number(body, "temperature", d["temperature"], 0.0, 2.0),
                        top_p=_number(body, "top_p", d["top_p"], 1e-6, 1.0),
                        top_k=_int(body, "top_k", d["top_k"], 0, 1 << 30),
                        min_p=_number(body, "min_p", d["min_p"], 0.0, 1.0),
                        repetition_penalty=_number(body, "repetition_penalty", d["repetition_penalty"],
                                                   1e-3, 100.0),
                        seed=_int(body, "seed", None, 0, (1 << 63) - 1), compile=compile)
    guard = body.get("repetition_guard", True)
    if not isinstance(guard, bool):
        raise RequestError("field 'repetition_guard' must be true or false")
    return Request(ids, sampling, tuple(stops), body.get("stream", False), chat, guard)


def parse_completion(body: Any, lm: LoadedModel, default_max: int = 16, compile: bool = False) -> Request:
    """POST /v1/completions: `prompt` (a string, or a list holding one) and sampling fields."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError("field 'prompt' must be a string (one prompt per request)")
    return _common(body, lm, lm.prompt_ids(prompt), False, default_max, compile)


def _text_content(m: dict, i: int) -> str:
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"messages[{i}].content: only text parts are supported")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}].content must be a string")
    return content


def parse_chat(body: Any, lm: LoadedModel, default_max: int = 256, compile: bool = False) -> Request:
    """POST /v1/chat/completions: `messages` rendered with the model's chat template."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {m.get('role')!r}")
        turns.append({"role": m["role"], "content": _text_content(m, i)})
    text = render_chat(lm.chat_template or DEFAULT_TEMPLATE, turns, add_generation_prompt=True,
                       bos_token=lm.bos_token, eos_token=lm.eos_token, name=lm.name)
    return _common(body, lm, lm.encode(text), True, default_max, compile)


def _usage(req: Request, gen) -> dict:
    n = gen.completion_tokens
    return {"prompt_tokens": len(req.ids), "completion_tokens": n, "total_tokens": len(req.ids) + n}


def response(req: Request, model: str, text: str, gen) -> dict:
    """The whole answer: a `text_completion` or a `chat.completion` object."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": gen.finish_reason, "logprobs": None}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "finish_reason": gen.finish_reason, "logprobs": None}
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + req.id, "object": kind, "created": req.created, "model": model,
            "choices": [choice], "usage": _usage(req, gen)}


def chunk(req: Request, model: str, piece: str | None, gen=None,
          first: bool = False) -> dict:
    """One streamed event: a text piece, or (piece None) the last one with the finish reason."""
    done = piece is None
    reason = gen.finish_reason if done and gen is not None else None
    if req.chat:
        delta: dict = {} if done else {"content": piece}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        kind, prefix = "chat.completion.chunk", "chatcmpl-"
    else:
        choice = {"index": 0, "text": "" if done else piece, "finish_reason": reason, "logprobs": None}
        kind, prefix = "text_completion", "cmpl-"
    out = {"id": prefix + req.id, "object": kind, "created": req.created, "model": model, "choices": [choice]}
    if done and gen is not None:
        out["usage"] = _usage(req, gen)
    return out
