"""The KD teacher's memoised outputs: same results as without, computed once per distinct batch."""

import copy

import pytest
import torch

from pruning_env.core.data import load_splits
from pruning_env.core.models import build
from pruning_env.engine.graph import prunable_layers
from pruning_env.engine.plan import plan_uniform
from pruning_env.engine.surgery import apply
from pruning_env.training.finalize import finalize
from pruning_env.training.finetune import FinetuneConfig, finetune
from pruning_env.training.proxy import kd_steps
from pruning_env.training.teacher import TeacherCache


@pytest.fixture(scope="module")
def splits():
    return load_splits("synthetic")


@pytest.fixture(scope="module")
def teacher(splits):
    torch.manual_seed(0)
    return build("vgg11", num_classes=splits.num_classes, width=0.125).eval()


def _student(teacher, rate, seed=0):
    layers = prunable_layers(teacher)
    gen = torch.Generator().manual_seed(seed)
    plan = plan_uniform({lay.name: torch.rand(lay.out_channels, generator=gen) for lay in layers}, rate)
    return apply(teacher, plan, layers=layers)


def _cfg(**kw):
    return FinetuneConfig(**{**dict(epochs=2, batch_size=64, lr=0.02, device="cpu", progress=False), **kw})


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fine_tunes_with_the_cache_equal_those_without_and_reuse_the_teacher(splits, teacher):
    cache = TeacherCache(teacher)
    for rate in (0.3, 0.6):  # two plans, one recipe: the second replays the first's batches
        plain, cached = _student(teacher, rate), _student(teacher, rate)
        s_plain = finetune(plain, splits, _cfg(), teacher=teacher)
        misses = cache.misses
        s_cached = finetune(cached, splits, _cfg(), teacher=teacher, teacher_cache=cache)
        assert _same_weights(plain, cached)
        assert s_plain["val_acc"] == s_cached["val_acc"]
        assert [h["train_loss"] for h in s_plain["history"]] == [h["train_loss"] for h in s_cached["history"]]
    steps = 2 * -(-len(splits.train) // 64)
    assert cache.misses == steps == misses  # the first run computed every batch once, the second none
    assert cache.hits == steps


def test_another_seed_misses_and_stays_exact(splits, teacher):
    cache = TeacherCache(teacher)
    finetune(_student(teacher, 0.5), splits, _cfg(seed=0), teacher=teacher, teacher_cache=cache)
    hits = cache.hits
    plain, cached = _student(teacher, 0.5), _student(teacher, 0.5)
    finetune(plain, splits, _cfg(seed=1), teacher=teacher)
    finetune(cached, splits, _cfg(seed=1), teacher=teacher, teacher_cache=cache)
    assert cache.hits == hits  # other shuffles and crops: nothing served from memory ...
    assert _same_weights(plain, cached)  # ... and the same run as without the cache


def test_changed_teacher_weights_empty_the_cache(splits, teacher):
    own = copy.deepcopy(teacher)
    cache = TeacherCache(own)
    finetune(_student(own, 0.5), splits, _cfg(epochs=1), teacher=own, teacher_cache=cache)
    assert len(cache) > 0
    with torch.no_grad():
        next(own.parameters()).mul_(0.5)
    plain, cached = _student(teacher, 0.5), _student(teacher, 0.5)
    finetune(plain, splits, _cfg(epochs=1), teacher=own)
    hits = cache.hits
    finetune(cached, splits, _cfg(epochs=1), teacher=own, teacher_cache=cache)
    assert cache.hits == hits  # stale outputs were dropped, not served
    assert _same_weights(plain, cached)


def test_kd_steps_and_finalize_use_the_cache_with_the_same_result(splits, teacher):
    cache = TeacherCache(teacher)
    a, b, c = (_student(teacher, 0.5) for _ in range(3))
    kd_steps(a, teacher, splits, 6, lr=0.01, batch_size=32, seed=0)
    kd_steps(b, teacher, splits, 6, lr=0.01, batch_size=32, seed=0, teacher_cache=cache)
    kd_steps(c, teacher, splits, 6, lr=0.01, batch_size=32, seed=0, teacher_cache=cache)
    assert _same_weights(a, b) and _same_weights(a, c)
    assert (cache.misses, cache.hits) == (6, 6)
    _, plain = finalize(teacher, splits, model=_student(teacher, 0.5), finetune_cfg=_cfg(epochs=1))
    _, cached = finalize(teacher, splits, model=_student(teacher, 0.5), finetune_cfg=_cfg(epochs=1),
                         teacher_cache=cache)
    assert plain["test_acc"] == cached["test_acc"] and plain["finetune"]["val_acc"] == cached["finetune"]["val_acc"]


def test_bad_cache_and_memory_bound(splits, teacher):
    other = TeacherCache(copy.deepcopy(teacher))
    with pytest.raises(ValueError, match="another network"):
        finetune(_student(teacher, 0.5), splits, _cfg(epochs=1), teacher=teacher, teacher_cache=other)
    with pytest.raises(ValueError, match="max_bytes"):
        TeacherCache(teacher, max_bytes=-1)
    small = TeacherCache(teacher, max_bytes=3 * 64 * splits.num_classes * 4)  # room for three batches
    finetune(_student(teacher, 0.5), splits, _cfg(epochs=1), teacher=teacher, teacher_cache=small)
    assert len(small) == 3  # the first three are kept; once full, nothing is evicted ...
    finetune(_student(teacher, 0.5), splits, _cfg(epochs=1), teacher=teacher, teacher_cache=small)
    assert small.hits == 3  # ... so a replay finds them (evicting the oldest would have left none)
