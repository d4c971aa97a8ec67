"""The distributed sampler: shards, determinism, and exact mid-epoch resume."""

from functools import partial

import pytest
import torch

from finetune.data import ResumableDistributedSampler, TokenizedDataset, build_dataloader, collate


def sampler(n: int, rank: int = 0, world_size: int = 1, **kwargs) -> ResumableDistributedSampler:  # type: ignore[no-untyped-def]
    kwargs.setdefault("seed", 3)
    return ResumableDistributedSampler(n, rank=rank, world_size=world_size, **kwargs)


def test_unshuffled_shards_by_hand() -> None:
    assert [list(sampler(5, r, 2, shuffle=False)) for r in (0, 1)] == [[0, 2, 4], [1, 3, 0]]
    assert [list(sampler(5, r, 2, shuffle=False, drop_last=True)) for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [list(sampler(2, r, 3, shuffle=False)) for r in (0, 1, 2)] == [[0], [1], [0]]


def test_shuffled_order_is_seeded_and_changes_per_epoch() -> None:
    s = sampler(50)
    s.set_epoch(0)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    again = sampler(50)
    again.set_epoch(1)
    assert list(again) == epoch1
    other_seed = sampler(50, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != epoch1
    generator = torch.Generator().manual_seed(3 + 1)
    assert epoch1 == torch.randperm(50, generator=generator).tolist()


def test_global_rng_does_not_change_the_order() -> None:
    torch.manual_seed(0)
    first = list(sampler(30))
    torch.manual_seed(1)
    assert list(sampler(30)) == first


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_disjoint_shards(drop_last: bool) -> None:
    shards = [list(sampler(11, r, 2, drop_last=drop_last)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (5 if drop_last else 6)
    seen = shards[0] + shards[1]
    if drop_last:
        assert len(set(seen)) == 10
    else:
        assert set(seen) == set(range(11)) and len(seen) == 12  # one index repeated


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("start", [0, 1, 7, 13])
def test_resumed_sampler_continues_the_uninterrupted_epoch(world_size: int, start: int) -> None:
    for rank in range(world_size):
        uninterrupted = sampler(27, rank, world_size)
        uninterrupted.set_epoch(2)
        full = list(uninterrupted)
        resumed = sampler(27, rank, world_size)  # a fresh process after a restart
        resumed.set_epoch(2, start_index=start)
        assert len(resumed) == len(full) - start
        assert list(resumed) == full[start:]
        resumed.set_epoch(3)  # the next epoch starts from its beginning again
        assert len(resumed) == len(full)


def test_start_index_past_the_shard_is_refused() -> None:
    s = sampler(10, 0, 2)
    s.set_epoch(0, start_index=5)
    assert list(s) == [] and len(s) == 0
    with pytest.raises(ValueError, match="start_index 6 is outside this rank's 5 samples"):
        s.set_epoch(0, start_index=6)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resumed_dataloader_yields_the_remaining_batches(world_size: int) -> None:
    dataset = TokenizedDataset(([i, i + 1, i + 2][: 1 + i % 3], [i] * (1 + i % 3)) for i in range(23))
    batch_size, consumed = 3, 2

    def batches(rank: int, start_index: int) -> list[list[list[int]]]:
        s = sampler(len(dataset), rank, world_size)
        s.set_epoch(1, start_index=start_index)
        loader = build_dataloader(dataset, batch_size=batch_size, sampler=s, collate_fn=partial(collate, pad_id=0))
        assert len(loader) == -(-len(s) // batch_size)
        return [batch["tokens"].tolist() for batch in loader]

    for rank in range(world_size):
        full = batches(rank, 0)
        assert batches(rank, consumed * batch_size) == full[consumed:]


def test_dataloader_workers_give_the_same_batches() -> None:
    dataset = TokenizedDataset(([i, i], [i, -100]) for i in range(10))
    s = sampler(len(dataset))
    in_process = [b["tokens"].tolist() for b in build_dataloader(dataset, batch_size=4, sampler=s)]
    with_worker = build_dataloader(dataset, batch_size=4, sampler=s, num_workers=1)
    assert [b["tokens"].tolist() for b in with_worker] == in_process
