"""The QMIX mixer is monotonic in every agent's Q: dQ_tot/dQ_i >= 0 for any state and weights."""

from __future__ import annotations

import pytest
import torch

from agents.qmix import IndependentMixer, QMIXConfig, QMixer, VDNMixer, list_mixers


@pytest.mark.parametrize("n_agents, state_dim, weight_scale", [(2, 3, 1.0), (5, 7, 3.0), (8, 16, 10.0)])
def test_qmix_gradient_wrt_agent_qs_is_non_negative(n_agents: int, state_dim: int, weight_scale: float) -> None:
    gen = torch.Generator().manual_seed(n_agents)
    for trial in range(5):
        torch.manual_seed(100 * n_agents + trial)
        mixer = QMixer(n_agents, state_dim, QMIXConfig())
        with torch.no_grad():  # arbitrary, large (signed) hypernetwork weights
            for p in mixer.parameters():
                p.normal_(0.0, weight_scale, generator=gen)
        states = torch.randn(4, 6, state_dim, generator=gen) * 5
        agent_qs = (torch.randn(4, 6, n_agents, generator=gen) * 20).requires_grad_(True)
        q_tot = mixer(agent_qs, states)
        assert q_tot.shape == (4, 6, 1)
        (grad,) = torch.autograd.grad(q_tot.sum(), agent_qs)
        assert grad.shape == agent_qs.shape
        assert (grad >= 0).all(), grad.min()
        assert (grad > 0).any()  # not trivially flat


def test_qmix_increasing_one_agent_q_never_decreases_q_tot() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mixer = QMixer(3, 4, QMIXConfig())
    states = torch.randn(256, 1, 4, generator=gen)
    agent_qs = torch.randn(256, 1, 3, generator=gen) * 10
    base = mixer(agent_qs, states)
    for i in range(3):
        bumped = agent_qs.clone()
        bumped[..., i] += torch.rand(256, 1, generator=gen) * 5
        assert (mixer(bumped, states) >= base - 1e-5).all()


def test_other_mixers_shapes_and_gradients() -> None:
    assert {"qmix", "vdn", "none"} <= set(list_mixers())
    qs = torch.randn(2, 3, 4, requires_grad=True)
    states = torch.randn(2, 3, 5)
    vdn = VDNMixer(4, 5, QMIXConfig())(qs, states)
    assert vdn.shape == (2, 3, 1)
    (grad,) = torch.autograd.grad(vdn.sum(), qs)
    assert torch.equal(grad, torch.ones_like(qs))
    assert torch.equal(IndependentMixer(4, 5, QMIXConfig())(qs, states), qs)


@pytest.mark.parametrize("n_agents, n_actions", [(2, 3), (3, 4)])
def test_qmix_per_agent_argmaxes_give_the_joint_argmax(n_agents: int, n_actions: int) -> None:
    """What monotonicity is for: decentralised greedy action selection is greedy for Q_tot."""
    gen = torch.Generator().manual_seed(n_agents)
    torch.manual_seed(n_agents)
    mixer = QMixer(n_agents, 3, QMIXConfig())
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 2.0, generator=gen)
    joint = torch.cartesian_prod(*[torch.arange(n_actions)] * n_agents)             # (A^n, n)
    for _ in range(20):
        q = torch.randn(n_agents, n_actions, generator=gen) * 5                       # per-agent Q values
        state = torch.randn(1, 1, 3, generator=gen).expand(1, joint.shape[0], 3)
        q_tot = mixer(q[torch.arange(n_agents), joint].unsqueeze(0), state).view(-1)  # Q_tot of every joint action
        greedy = q.argmax(dim=1)
        assert q_tot[(joint == greedy).all(dim=1)].item() == pytest.approx(q_tot.max().item())
