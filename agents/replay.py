"""Episode replay for the value-decomposition learners: a ring buffer of whole episodes and TD(lambda) targets."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["EpisodeReplayBuffer", "lambda_returns"]


class EpisodeReplayBuffer:
    """Ring buffer of whole episodes (capacity counted in episodes).

    An episode of T steps is a dict of CPU tensors:
    ``obs`` (T+1, n, obs_dim) float32, ``state`` (T+1, state_dim) float32,
    ``avail`` (T+1, n, n_actions) bool, ``actions`` (T, n) int64, ``reward`` (T,) float32,
    ``terminated`` (T,) float32. :meth:`sample` pads to the longest episode drawn and
    adds ``mask`` (B, T_max) float32, 1 on real steps.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("obs", "state", "avail", "actions", "reward", "terminated")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("buffer capacity must be >= 1")
        self.capacity = capacity
        self.episodes: list[dict[str, torch.Tensor]] = []
        self.next_slot = 0

    def __len__(self) -> int:
        return len(self.episodes)

    def add(self, episode: dict[str, torch.Tensor]) -> None:
        if len(self.episodes) < self.capacity:
            self.episodes.append(episode)
        else:
            self.episodes[self.next_slot] = episode
        self.next_slot = (self.next_slot + 1) % self.capacity

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Draw ``min(batch_size, len)`` distinct episodes uniformly; returns padded (B, ...) tensors."""
        idx = rng.choice(len(self.episodes), size=min(batch_size, len(self.episodes)), replace=False)
        eps = [self.episodes[i] for i in idx]
        t_max = max(int(e["actions"].shape[0]) for e in eps)
        out: dict[str, torch.Tensor] = {}
        for key in self.KEYS:
            steps = t_max + 1 if key in ("obs", "state", "avail") else t_max
            fill = True if key == "avail" else 0
            padded = []
            for e in eps:
                x = e[key]
                pad = torch.full((steps - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype)
                padded.append(torch.cat([x, pad]))
            out[key] = torch.stack(padded)
        lengths = torch.tensor([int(e["actions"].shape[0]) for e in eps])
        out["mask"] = (torch.arange(t_max)[None, :] < lengths[:, None]).float()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "episodes": list(self.episodes), "next_slot": self.next_slot}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.capacity = int(d["capacity"])
        self.episodes = [dict(e) for e in d["episodes"]]
        self.next_slot = int(d["next_slot"])


def lambda_returns(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    mask: torch.Tensor,
    next_values: torch.Tensor,
    gamma: float,
    td_lambda: float,
) -> torch.Tensor:
    """TD(lambda) targets, shape (B, T, k).

    ``reward``, ``terminated``, ``mask``: (B, T); ``next_values``: (B, T, k), the target
    value of the state reached by step t. ``G_t = r_t + gamma (1 - term_t)
    [(1 - lambda) V_{t+1} + lambda G_{t+1}]``, where the lambda part is dropped at the
    episode's last step (a truncated episode bootstraps from V of its final state).
    ``td_lambda = 0`` gives one-step targets.
    """
    time = reward.shape[1]
    returns = torch.zeros_like(next_values)
    g_next = torch.zeros_like(next_values[:, 0])
    for t in reversed(range(time)):
        cont = (mask[:, t + 1] if t + 1 < time else torch.zeros_like(mask[:, 0]))[:, None] * td_lambda
        boot = (1.0 - cont) * next_values[:, t] + cont * g_next
        g = reward[:, t, None] + gamma * (1.0 - terminated[:, t, None]) * boot
        returns[:, t] = g
        g_next = g
    return returns
