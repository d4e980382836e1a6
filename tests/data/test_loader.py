"""Deterministic, resumable batching: order from (seed, epoch), instant skip, rank split."""

from __future__ import annotations

import pytest
import torch

from mmgpt.data.loader import ResumableLoader, epoch_permutation


class Indexed(torch.utils.data.Dataset):
    """Sample i is {"x": i}; counts __getitem__ calls."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.fetched += 1
        return {"x": torch.tensor(i)}


def ids(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["x"].tolist()


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a = epoch_permutation(50, seed=3, epoch=0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, epoch_permutation(50, seed=3, epoch=0))
    assert not torch.equal(a, epoch_permutation(50, seed=3, epoch=1))
    assert not torch.equal(a, epoch_permutation(50, seed=4, epoch=0))
    assert sorted(a.tolist()) == list(range(50))


def test_global_rng_untouched() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(ResumableLoader(Indexed(10), 3, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_epoch_drops_incomplete_last_batch_and_covers_the_rest() -> None:
    loader = ResumableLoader(Indexed(11), 3, seed=0)
    assert len(loader) == 3
    batches = [ids(b) for b in loader]
    flat = [i for b in batches for i in b]
    assert len(flat) == 9 and len(set(flat)) == 9
    assert flat == epoch_permutation(11, 0, 0)[:9].tolist()
    assert (loader.epoch, loader.index) == (1, 0)


def test_resume_mid_epoch_and_across_epochs_matches_uninterrupted() -> None:
    reference = ResumableLoader(Indexed(10), 4, seed=7)
    stream = reference.forever()
    expected = [ids(next(stream)) for _ in range(9)]  # 2 batches per epoch: 4+ epochs

    loader = ResumableLoader(Indexed(10), 4, seed=7)
    stream = loader.forever()
    got = [ids(next(stream)) for _ in range(3)]
    state = loader.state_dict()
    assert (state["epoch"], state["index"]) == (1, 1)

    data = Indexed(10)
    resumed = ResumableLoader(data, 4, seed=7)
    resumed.load_state_dict(state)
    stream = resumed.forever()
    got.append(ids(next(stream)))
    assert data.fetched == 4  # skipping is index arithmetic: only the new batch was read
    got += [ids(next(stream)) for _ in range(5)]
    assert got == expected


def test_position_at_epoch_end_rolls_over() -> None:
    loader = ResumableLoader(Indexed(8), 4, seed=0)
    list(loader)
    resumed = ResumableLoader(Indexed(8), 4, seed=0)
    resumed.load_state_dict({"epoch": 0, "index": 2})  # saved at the end of epoch 0
    assert ids(next(resumed.forever())) == ids(next(loader.iter_epoch(1)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_disjoint_strided_slices_of_one_permutation(world_size: int) -> None:
    n, batch = 23, 2
    per_rank = [
        [ids(b) for b in ResumableLoader(Indexed(n), batch, seed=5, rank=r, world_size=world_size)]
        for r in range(world_size)
    ]
    counts = {len(b) for b in per_rank}
    assert counts == {n // (batch * world_size)}  # same number of batches on every rank
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen))  # no duplicates
    kept = epoch_permutation(n, 5, 0)[: len(seen)].tolist()
    assert sorted(seen) == sorted(kept)  # nothing dropped but the incomplete global batch
    for r in range(world_size):
        assert [i for b in per_rank[r] for i in b] == kept[r::world_size]


def test_eval_order_keeps_the_tail() -> None:
    loader = ResumableLoader(Indexed(7), 3, shuffle=False, drop_last=False)
    assert [ids(b) for b in loader.iter_epoch(0)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(loader) == 3


def test_workers_give_the_same_batches() -> None:
    plain = [ids(b) for b in ResumableLoader(Indexed(12), 3, seed=2).iter_epoch(0, start=1)]
    workers = ResumableLoader(Indexed(12), 3, seed=2, num_workers=1)
    assert [ids(b) for b in workers.iter_epoch(0, start=1)] == plain


def test_custom_collate() -> None:
    loader = ResumableLoader(Indexed(4), 2, shuffle=False, collate_fn=lambda s: len(s))
    assert list(loader) == [2, 2]


def test_errors() -> None:
    with pytest.raises(ValueError, match="no full batch"):
        next(ResumableLoader(Indexed(3), 4).forever())
    with pytest.raises(ValueError, match="rank"):
        ResumableLoader(Indexed(3), 1, rank=2, world_size=2)
    with pytest.raises(TypeError, match="map-style"):
        ResumableLoader(iter([1, 2]), 1)
    loader = ResumableLoader(Indexed(8), 2)
    with pytest.raises(ValueError, match="num_samples=9"):
        loader.load_state_dict({"epoch": 0, "index": 1, "num_samples": 9})
