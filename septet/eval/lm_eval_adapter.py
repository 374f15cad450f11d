"""A `septet` model type for EleutherAI's lm-evaluation-harness (lm_eval 0.4).

Importing this module registers it; then any lm-eval task runs on any septet model:

    import lm_eval, septet.eval.lm_eval_adapter  # noqa: F401
    lm_eval.simple_evaluate(model="septet", model_args="model=smollm2,batch_size=16",
                            tasks=["my_task"], task_manager=lm_eval.tasks.TaskManager(include_path=...))

or, from Python with a model already in memory, `SeptetLM(loaded=septet.load(...))`.

The three request types map onto septet.eval.scoring.Scorer: `loglikelihood` with
lm-eval's own tokenisation convention ("joint" boundary, over-long contexts cut from the
left), `loglikelihood_rolling` in disjoint context-sized windows as lm-eval's HF model
does, and `generate_until` by batched greedy decoding.
"""

from __future__ import annotations

import warnings

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..errors import InputError
from .scoring import Scorer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


@register_model("septet")
class SeptetLM(LM):
    """lm-eval model arguments: model (asset name or path), dtype, device, batch_size.
    `max_batch_size` is accepted because lm-eval always passes it; it is not used."""

    def __init__(self, model: str = "smollm2", dtype: str = "fp32", device: str | None = None,
                 batch_size: int | str | None = 16, max_batch_size: int | None = None,
                 loaded=None, scorer: Scorer | None = None):
        super().__init__()
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            batch_size = 16  # no automatic search: a fixed, memory-safe size on CPU
        if scorer is None:
            if loaded is None:
                from ..api import load

                loaded = load(model, dtype=dtype, device=device or "cpu")
            scorer = Scorer.from_loaded(loaded, batch_size=int(batch_size))
        self.scorer = scorer
        self.model_name = getattr(loaded, "name", None) or model
        self._warned_sampling = False

    # lm-eval reads these for bookkeeping
    @property
    def tokenizer_name(self) -> str:
        return f"septet:{self.model_name}"

    @property
    def max_length(self) -> int:
        return self.scorer.context

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        scored = self.scorer.loglikelihood(pairs, boundary="joint", truncate=True)
        return [(s.logprob, s.is_greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [self.scorer.rolling_loglikelihood(r.args[0]).logprob for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}  # equal settings decode as one batch
        for i, r in enumerate(requests):
            until, max_toks = self._gen_settings(r.args[1] if len(r.args) > 1 else {})
            groups.setdefault((until, max_toks), []).append(i)
        for (until, max_toks), idx in groups.items():
            texts = self.scorer.generate_until([requests[i].args[0] for i in idx], stop=until,
                                               max_new_tokens=max_toks)
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]

    def _gen_settings(self, kw) -> tuple[tuple[str, ...], int]:
        if not isinstance(kw, dict):
            raise InputError(f"generate_until expects a dict of generation settings, got {type(kw).__name__}")
        until = kw.get("until", ())
        until = (until,) if isinstance(until, str) else tuple(until or ())
        sampling = kw.get("do_sample", False) and float(kw.get("temperature", 1.0) or 0.0) > 0
        if sampling and not self._warned_sampling:
            warnings.warn("septet's lm-eval adapter decodes greedily; do_sample/temperature are ignored",
                          stacklevel=2)
            self._warned_sampling = True
        return until, int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
