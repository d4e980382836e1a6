"""Tar shards (webdataset layout): grouping by key, patterns, problems with shard and member,
the streaming loader's shuffle and its exact resume at every batch, ranks, ``data check``."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgpt.data.check import check_dataset, detect_format
from mmgpt.data.errors import DataError
from mmgpt.data.loader import ResumableLoader, StreamingLoader
from mmgpt.data.shards import ShardDataset, expand_braces, resolve_shards, split_key


def png(colour: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, shards: int = 3, per_shard: int = 5) -> list[str]:
    """Shards of captioned PNGs; sample ``s*100+i`` has a colour that encodes its number.
    Returns the captions in shard order."""
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:02d}{i:04d}"
                caption = f"sample {s * 100 + i}"
                add(tar, f"{key}.png", png((s * 60, i * 40, 7)))
                add(tar, f"{key}.txt", caption.encode())
                captions.append(caption)
    return captions


def captions(batch: list) -> list[str]:
    return [sample.conversation[-1].text for sample in batch]


def loader(dataset: ShardDataset, batch_size: int = 2, **kwargs) -> ResumableLoader:
    return ResumableLoader(dataset, batch_size, collate_fn=captions, **kwargs)


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "shards"
    return root, write_shards(root)


def test_samples_in_shard_order_with_images_and_captions(shards) -> None:
    root, expected = shards
    samples = list(ShardDataset(root))
    assert [s.conversation[1].text for s in samples] == expected
    first = samples[0]
    assert first.conversation[0].text == "<image>\nDescribe the image."
    assert first.images[0].size == (6, 5) and first.images[0].getpixel((0, 0)) == (0, 0, 7)
    assert first.meta["key"] == "000000" and first.meta["line"] == 1
    assert Path(first.meta["source"]).name == "shard-000000.tar"
    assert samples[6].images[0].getpixel((0, 0)) == (60, 40, 7)


def test_tasks_json_conversations_and_several_images(tmp_path: Path) -> None:
    shard = tmp_path / "a.tar"
    conversation = [
        {"from": "human", "value": "<image> vs <image>?"},
        {"from": "gpt", "value": "same"},
    ]
    with tarfile.open(shard, "w") as tar:
        add(tar, "x/0001.png", png((1, 2, 3)))
        add(tar, "x/0001.txt", b"a red square\n")
        add(tar, "x/0002.0.png", png((9, 9, 9)))
        add(tar, "x/0002.1.png", png((8, 8, 8)))
        add(tar, "x/0002.json", json.dumps({"conversations": conversation, "id": 7}).encode())
    mixed = list(ShardDataset(shard, task="mixed", prompt_template="draw {text}"))
    assert [s.conversation[0].text for s in mixed] == [
        "<image>\nDescribe the image.",
        "draw a red square",
        "<image> vs <image>?",
    ]
    assert len(mixed[1].output_images) == 1 and not mixed[1].images  # the drawing sample
    assert [im.getpixel((0, 0)) for im in mixed[2].images] == [(9, 9, 9), (8, 8, 8)]
    assert mixed[2].meta["id"] == 7 and mixed[2].meta["key"] == "x/0002"


def test_patterns_and_keys(shards, tmp_path: Path) -> None:
    root, _ = shards
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    names = [p.name for p in resolve_shards(f"{root}/shard-{{000000..000001}}.tar")]
    assert names == ["shard-000000.tar", "shard-000001.tar"]
    assert len(resolve_shards(f"{root}/*.tar")) == 3 and len(resolve_shards(root)) == 3
    with pytest.raises(DataError, match="shard-000003.tar: shard not found"):
        resolve_shards(f"{root}/shard-{{000002..000003}}.tar")
    assert split_key("dir/0001.seg.png") == ("dir/0001", "seg.png")
    assert split_key("._0001.jpg") is None and split_key("README") is None
    assert detect_format(root) == ("shards", root)
    assert detect_format(f"{root}/shard-{{000000..000002}}.tar")[0] == "shards"
    assert detect_format(root / "shard-000000.tar")[0] == "shards"


def bad_shard(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        add(tar, "0001.png", png((1, 1, 1)))  # no text
        add(tar, "0002.png", png((2, 2, 2)))
        add(tar, "0002.json", b"{not json")
        add(tar, "0003.png", b"%!PS-Adobe-3.0 EPSF-3.0\n")  # PostScript named .png
        add(tar, "0003.txt", b"renamed eps")
        link = tarfile.TarInfo("0004.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add(tar, "0004.txt", b"a link")
        add(tar, "0005.png", png((5, 5, 5)))
        add(tar, "0005.txt", b"good")
    data = bytearray(path.read_bytes())
    end = data.rindex(b"good") + 512 - (data.rindex(b"good") % 512)
    data[end : end + 512] = b"garbage!" * 64  # a damaged header after the last sample
    path.write_bytes(bytes(data))


def test_problems_name_the_shard_member_and_key(tmp_path: Path) -> None:
    shard = tmp_path / "bad.tar"
    bad_shard(shard)
    dataset = ShardDataset(shard)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        samples = list(dataset)
    assert [s.conversation[1].text for s in samples] == ["good"]
    found = {(p.line, p.id, p.reason) for p in dataset.problems}
    assert found == {
        (1, "0001", "missing_field"),
        (2, "0002", "bad_json"),
        (4, "0003", "unsupported_format"),
        (6, "0004", "bad_member"),
        (10, None, "bad_shard"),
    }
    assert all(p.file == str(shard) for p in dataset.problems)
    with pytest.raises(DataError, match=r"bad\.tar:1 \(id 0001\): missing_field"):
        list(ShardDataset(shard, strict=True))

    report = check_dataset(shard)
    assert report.format == "shards" and report.num_samples == 1 and report.exit_code == 1
    text = report.to_text()
    assert f"{shard}:4 (id 0003): unsupported_format" in text
    assert f"{shard}:10: bad_shard" in text


def test_not_a_tar_file_and_duplicate_keys(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(b"just text, no tar")
    report = check_dataset(tmp_path / "x.tar")
    assert [(p.line, p.reason) for p in report.problems] == [(1, "bad_shard")]
    write_shards(tmp_path / "dup", shards=2, per_shard=1)
    other = tmp_path / "dup" / "shard-000001.tar"
    with tarfile.open(other, "w") as tar:  # the same key as shard 0's sample
        add(tar, "000000.png", png((3, 3, 3)))
        add(tar, "000000.txt", b"again")
    report = check_dataset(tmp_path / "dup")
    assert report.ok and [w.reason for w in report.warnings] == ["duplicate_key"]
    assert "shard-000000.tar:1" in report.warnings[0].message


def test_shuffled_epochs_cover_every_sample_once(shards) -> None:
    root, expected = shards
    dataset = ShardDataset(root, shuffle_buffer=4)
    plain = loader(dataset, batch_size=5, shuffle=False)
    assert isinstance(plain, StreamingLoader)
    assert [c for b in plain for c in b] == expected  # unshuffled: the shards' order

    shuffled = loader(dataset, batch_size=5, seed=3)
    epoch0 = [c for b in shuffled for c in b]
    assert sorted(epoch0) == sorted(expected) and epoch0 != expected
    assert (shuffled.epoch, shuffled.index) == (1, 0)
    epoch1 = [c for b in shuffled for c in b]
    assert sorted(epoch1) == sorted(expected) and epoch1 != epoch0  # a new order per epoch
    again = loader(ShardDataset(root, shuffle_buffer=4), batch_size=5, seed=3)
    assert [c for b in again for c in b] == epoch0  # a function of the seed
    torch.manual_seed(99)  # the global RNG plays no part
    assert [c for b in loader(dataset, batch_size=5, seed=3) for c in b] == epoch0


@pytest.mark.parametrize("task", ["caption", "mixed"])
def test_resume_at_every_batch_matches_the_uninterrupted_stream(shards, task: str) -> None:
    root, _ = shards
    steps = 24  # 15 (or 30) samples in batches of 2: several epochs, dropped tails

    def make() -> ResumableLoader:
        return loader(ShardDataset(root, shuffle_buffer=4, task=task), seed=11)

    stream = make().forever()
    expected = [next(stream) for _ in range(steps)]
    for cut in range(steps):
        first = make()
        head = first.forever()
        got = [next(head) for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
        resumed = make()
        resumed.load_state_dict(state)
        tail = resumed.forever()
        got += [next(tail) for _ in range(steps - cut)]
        assert got == expected, f"resumed after {cut} batches"


def test_resume_refuses_other_data_or_shuffle(shards, tmp_path: Path) -> None:
    root, _ = shards
    first = loader(ShardDataset(root, shuffle_buffer=4), seed=1)
    next(first.forever())
    state = first.state_dict()
    with pytest.raises(ValueError, match="shuffle_buffer"):
        loader(ShardDataset(root, shuffle_buffer=5), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        loader(ShardDataset(root, shuffle_buffer=4), seed=2).load_state_dict(state)
    write_shards(tmp_path / "other", shards=2)
    with pytest.raises(ValueError, match="the shards changed"):
        loader(ShardDataset(tmp_path / "other", shuffle_buffer=4), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="map-style"):
        loader(ShardDataset(root, shuffle_buffer=4), seed=1).load_state_dict(
            {"epoch": 0, "index": 1}
        )


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch(shards, world_size: int) -> None:
    root, _ = shards
    batch = 2
    one = loader(ShardDataset(root, shuffle_buffer=4), batch_size=batch * world_size, seed=5)
    global_batches = list(one)
    per_rank = [
        list(
            loader(
                ShardDataset(root, shuffle_buffer=4),
                batch_size=batch,
                seed=5,
                rank=r,
                world_size=world_size,
            )
        )
        for r in range(world_size)
    ]
    assert {len(b) for b in per_rank} == {len(global_batches)}
    for i, whole in enumerate(global_batches):
        for r in range(world_size):
            assert per_rank[r][i] == whole[r::world_size]


def test_unloadable_image_is_replaced_within_the_batch(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            add(tar, f"{i}.png", png((i, i, i)) if i != 1 else png((1, 1, 1))[:-30])  # truncated
            add(tar, f"{i}.txt", f"c{i}".encode())
    dataset = ShardDataset(shard, shuffle_buffer=1)
    with pytest.warns(RuntimeWarning, match=r"s\.tar:3 \(id 1\): (truncated|corrupt)_image"):
        batches = list(loader(dataset, batch_size=2, shuffle=False, num_workers=2))
    assert batches == [["c0", "c0"], ["c2", "c3"]]  # slot 1 took the next loadable of its batch
    assert sum(dataset.skipped.values()) == 1


def test_no_full_batch_is_an_error(tmp_path: Path) -> None:
    write_shards(tmp_path / "few", shards=1, per_shard=3)
    with pytest.raises(ValueError, match="no full batch of 4"):
        next(loader(ShardDataset(tmp_path / "few"), batch_size=4).forever())


def test_shards_written_by_webdataset_read_the_same(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset", reason="webdataset writes the reference shards")
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=2, verbose=0) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i:03d}", "png": png((i, 0, 0)), "txt": f"cap {i}"})
    samples = list(ShardDataset(tmp_path / "wds-{000000..000002}.tar"))
    assert [s.conversation[1].text for s in samples] == [f"cap {i}" for i in range(5)]
    assert [s.images[0].getpixel((0, 0)) for s in samples] == [(i, 0, 0) for i in range(5)]


def test_gzipped_shards_read_and_resume(tmp_path: Path) -> None:
    expected = []
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar.gz", "w:gz") as tar:
            for i in range(4):
                add(tar, f"{s}{i}.png", png((s, i, 0)))
                add(tar, f"{s}{i}.txt", f"gz {s}{i}".encode())
                expected.append(f"gz {s}{i}")
    assert [s.conversation[1].text for s in ShardDataset(tmp_path)] == expected

    def make() -> ResumableLoader:
        return loader(ShardDataset(str(tmp_path / "*.tar.gz"), shuffle_buffer=3), seed=2)

    stream = make().forever()
    reference = [next(stream) for _ in range(6)]
    first = make()
    head = first.forever()
    got = [next(head) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = resumed.forever()
    assert got + [next(tail) for _ in range(3)] == reference
