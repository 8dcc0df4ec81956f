"""ResizableBatchSampler: epoch coverage under resizes on 1 and 2 ranks, short last steps, exact resume."""

from __future__ import annotations

from collections import Counter

import pytest

from lightning_lbo.batch_sampler import ResizableBatchSampler


def ranks(num_samples: int, batch_size: int, world: int, **kwargs) -> list[ResizableBatchSampler]:
    return [ResizableBatchSampler(num_samples, batch_size, num_replicas=world, rank=r, seed=3, **kwargs)
            for r in range(world)]


def take(samplers: list[ResizableBatchSampler], steps: int | None = None, resize_at: dict[int, int] | None = None):
    """Iterate all ranks in lockstep; resize every rank before step `s` as `resize_at[s]` says."""
    iters = [iter(s) for s in samplers]
    out = []
    for step in range(10**6 if steps is None else steps):
        for size in [(resize_at or {}).get(step)] if resize_at and step in resize_at else []:
            for s in samplers:
                s.set_batch_size(size)
        try:
            out.append([next(it) for it in iters])
        except StopIteration:
            break
        for s in samplers:
            s.mark_consumed()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_covers_each_epoch_exactly_once_under_resizes(world):
    """Resized mid-epoch and between epochs: every index once per epoch over all ranks, ranks in step."""
    samplers = ranks(103, 4, world)
    for epoch, resize_at in enumerate(({3: 8, 5: 16}, {0: 32}, {})):
        for s in samplers:
            s.set_epoch(epoch)
        steps = take(samplers, resize_at=resize_at)
        seen = Counter(i for step in steps for batch in step for i in batch)
        assert sorted(seen) == list(range(103)) and set(seen.values()) == {1}, epoch
        assert all(len(step) == world for step in steps)
    first = ResizableBatchSampler(103, 4, seed=3)
    assert list(first) != list(ResizableBatchSampler(103, 4, seed=4))  # the seed shuffles
    first.set_epoch(1)
    assert list(first) != list(ResizableBatchSampler(103, 4, seed=3))  # and so does the epoch


def test_sampler_splits_and_pads_the_short_last_step():
    """A short last step is split nearly evenly; fewer samples than ranks reuse an index; drop_last drops."""
    steps = take(ranks(10, 4, 2))
    assert [[len(b) for b in step] for step in steps] == [[4, 4], [1, 1]]
    steps = take(ranks(9, 4, 2))
    assert [len(b) for b in steps[-1]] == [1, 1] and steps[-1][0] == steps[-1][1]  # 1 left for 2 ranks
    assert len(ranks(9, 4, 2, drop_last=True)[0]) == 1
    assert [len(ResizableBatchSampler(10, 4, num_replicas=2, rank=0)), ranks(10, 4, 2)[0].epoch_length(2)] == [2, 3]


def test_sampler_resume_replays_exactly_the_untrained_batches():
    """State saved with a prefetched batch at the old size: the resumed sampler yields the same tail."""
    full = ranks(50, 3, 2)
    reference = take(full, resize_at={4: 5})
    interrupted = ranks(50, 3, 2)
    iters = [iter(s) for s in interrupted]
    for step in range(4):
        [next(it) for it in iters]
        if step < 3:  # 3 batches trained; batch 3 drawn (prefetched) but not trained
            for s in interrupted:
                s.mark_consumed()
    for s in interrupted:
        s.set_batch_size(5)  # the resize the full run applied before drawing step 4
    states = [s.state_dict() for s in interrupted]
    resumed = ranks(50, 3, 2)
    for s, state in zip(resumed, states, strict=True):
        s.load_state_dict(state)
        s.set_epoch(0)  # Lightning sets the same epoch again: the cursor is kept
    assert len(resumed[0]) == len(reference)
    assert take(resumed) == reference[3:]
    with pytest.raises(ValueError, match="same training set"):
        ResizableBatchSampler(51, 3).load_state_dict(states[0])


def test_sampler_state_at_the_epoch_end_starts_the_next_epoch():
    """A state saved after the last batch resumes at the next epoch's start, not at an empty epoch."""
    sampler = ResizableBatchSampler(20, 8, seed=1)
    take([sampler])
    state = sampler.state_dict()
    resumed = ResizableBatchSampler(20, 8, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    nxt = ResizableBatchSampler(20, 8, seed=1)
    nxt.set_epoch(1)
    assert len(resumed) == 3 and list(resumed) == list(nxt)


def test_sampler_rejects_bad_arguments():
    """Sizes and ranks are validated at construction."""
    with pytest.raises(ValueError, match="Invalid batch_size"):
        ResizableBatchSampler(10, 0)
    with pytest.raises(ValueError, match="Invalid rank"):
        ResizableBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="Invalid batch_size"):
        ResizableBatchSampler(10, 2).set_batch_size(-1)
