"""PaLM's loss-spike remedy (Chowdhery et al. 2022, §5.1): when the loss jumps, restart from
a checkpoint taken before the spike and skip the batches seen in between. The spikes did
not recur, so they came from the pairing of a model state with particular batches."""

from __future__ import annotations

import math
import statistics
from collections import deque


class SpikeGuard:
    """Flags a step whose loss exceeds `factor` × the median of the last `window` losses
    (or is not finite). Spike steps are not added to the history."""

    def __init__(self, factor: float = 1.5, window: int = 50):
        self.factor, self.window = factor, window
        self.history: deque[float] = deque(maxlen=window)

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if not self.enabled or len(self.history) < self.window:
            return False
        return loss > self.factor * statistics.median(self.history)

    def record(self, loss: float) -> None:
        self.history.append(loss)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state.get("history", []), maxlen=self.window)
