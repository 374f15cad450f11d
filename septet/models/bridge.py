"""What Flamingo and BLIP-2 share: a trainable bridge around a frozen LM held as `self.lm`.

A checkpoint stores the bridge only (the LM is named, not copied), so both models save and
load every weight except the `lm.` ones, and train only what still requires grad.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError


class FrozenLMBridge(nn.Module):
    bridge_name = "bridge"  # for error messages

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def bridge_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only (everything but the frozen LM): what a checkpoint stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def load_bridge_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.bridge_state_dict())
        if set(state) != expected:
            diff = sorted(set(state) ^ expected)
            raise CheckpointError(f"{self.bridge_name} bridge weights do not match this model (first "
                                  f"difference: '{diff[0]}'); was it trained with another config or LM?")
        self.load_state_dict(state, strict=False)
