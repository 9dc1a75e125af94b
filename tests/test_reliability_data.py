"""Issue 14, cases 5 and 6: the decoded-image cache never serves stale or broken data, and data-set layout
problems are clear errors."""

import os

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

import pruning_env.core.data as data
from pruning_env.core.data import DataError, cache_dir, load_dataset


def _entries():
    root = cache_dir() / "decoded"
    return sorted(root.iterdir()) if root.is_dir() else []


def test_rewriting_images_in_place_in_a_big_folder_is_seen(tmp_path):
    write_image_folder(tmp_path / "toy", per_class=70)  # 70 files per class folder: more than 64
    first = load_dataset("toy", tmp_path)
    f = tmp_path / "toy" / "train" / "class_0" / "0000.png"
    stat = f.stat()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(f)  # same name, same folder entry count
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    second = load_dataset("toy", tmp_path)
    assert not torch.equal(first.train.images, second.train.images)
    assert int(second.train.images[0].sum()) == 0  # the sorted first file of class_0


@pytest.mark.parametrize("damage", ["zero-byte", "garbage", "labels-short", "labels-range", "no-meta-classes"])
def test_a_broken_or_inconsistent_cache_entry_is_rebuilt(tmp_path, damage):
    write_image_folder(tmp_path / "toy")
    first = load_dataset("toy", tmp_path)
    dc = data.decoded_cache
    entry = cache_dir() / "decoded" / dc.entry_name("toy", dc.source_key(tmp_path / "toy"))
    assert (entry / "meta.json").is_file()
    if damage == "zero-byte":
        (entry / "xtr.npy").write_bytes(b"")
    elif damage == "garbage":
        (entry / "yte.npy").write_bytes(b"\x93NUMPY garbage")
    elif damage == "labels-short":
        np.save(entry / "ytr.npy", np.zeros(3, dtype=np.int64))
    elif damage == "labels-range":
        np.save(entry / "ytr.npy", np.full(len(first.train), 99, dtype=np.int64))
    else:
        (entry / "meta.json").write_text("{}")
    again = load_dataset("toy", tmp_path)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.train.labels, first.train.labels)
    assert torch.equal(again.test.labels, first.test.labels)


def test_empty_class_folder_is_an_error(tmp_path):
    write_image_folder(tmp_path / "toy")
    (tmp_path / "toy" / "train" / "class_9").mkdir()
    (tmp_path / "toy" / "test" / "class_9").mkdir()
    with pytest.raises(DataError, match="class_9 has no image files"):
        load_dataset("toy", tmp_path, use_cache=False)


def test_test_classes_missing_from_train_are_an_error(tmp_path):
    write_image_folder(tmp_path / "toy")
    extra = tmp_path / "toy" / "test" / "class_7"
    extra.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(extra / "a.png")
    with pytest.raises(DataError, match="class_7.*same classes"):
        load_dataset("toy", tmp_path, use_cache=False)


@pytest.mark.parametrize("name", ["../toy", "sub/toy", "/abs/toy", ".."])
def test_a_data_set_name_that_is_a_path_is_refused(tmp_path, name):
    write_image_folder(tmp_path / "toy")
    with pytest.raises(DataError, match="not a plain name.*--data-dir"):
        load_dataset(name, tmp_path / "sub")
    assert not any(".." in e.name or "/" in e.name for e in _entries())


def test_cache_entry_names_stay_inside_the_cache():
    assert "/" not in data.decoded_cache.entry_name("../../etc", "k")
    assert data.decoded_cache.entry_name("../../etc", "k").startswith("_")


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path):
    """Issue 25, section 1, case 5 (untrusted files): the CIFAR python batches are unpickled with an allow-list."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1], b"x": _RunsCode(marker)}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    with pytest.raises(DataError, match=r"names the global io\.open"):
        load_dataset("cifar10", tmp_path, download=False, use_cache=False)
    assert not marker.exists()


def test_a_process_filling_the_decoded_cache_is_waited_for_and_its_entry_read(tmp_path, monkeypatch):
    """Issue 25, section 1, case 1 (caches): two processes decoding one source decode it once."""
    import threading

    from pruning_env.core.checkpoint import run_lock

    write_image_folder(tmp_path / "toy")
    reference = load_dataset("toy", tmp_path, use_cache=False)
    dc = data.decoded_cache
    entry = cache_dir() / "decoded" / dc.entry_name("toy", dc.source_key(tmp_path / "toy"))
    held = threading.Event()

    def other_process():  # decodes the source into the cache meanwhile
        with run_lock(entry, "cache"):
            held.set()
            threading.Event().wait(0.3)
            arrays = {"xtr": reference.train.images.numpy(), "ytr": reference.train.labels.numpy(),
                      "xte": reference.test.images.numpy(), "yte": reference.test.labels.numpy()}
            dc.write_entry(entry, reference.classes, arrays, "other")

    t = threading.Thread(target=other_process)
    t.start()
    held.wait(10)
    monkeypatch.setattr(data, "_decode", lambda *a, **k: pytest.fail("decoded again"))
    again = load_dataset("toy", tmp_path)
    t.join()
    assert torch.equal(again.train.images, reference.train.images)
