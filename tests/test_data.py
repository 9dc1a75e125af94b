import pickle

import numpy as np
import pytest
import torch
from conftest import cifar_root, requires_cifar, write_image_folder

import pruning_env.core.data as data_module
from pruning_env.core.data import (
    DataError,
    DatasetInfo,
    augment,
    batches,
    dataset_info,
    load_dataset,
    load_splits,
    make_synthetic,
)


def _write_cifar_python(root, n_per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             b"labels": list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as fh:
            pickle.dump(d, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    return folder


def test_cifar_python_format_loads(tmp_path):
    folder = _write_cifar_python(tmp_path)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.train.images.shape == (100, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (20, 3, 32, 32)
    assert ds.classes == [f"c{i}" for i in range(10)]
    with open(folder / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh)
    assert np.array_equal(ds.train.images[0].numpy().reshape(-1), raw[b"data"][0])


@pytest.mark.parametrize("mode,fmt", [("RGB", "png"), ("L", "jpg")])
def test_image_folder_loads_rgb_and_grayscale(tmp_path, mode, fmt):
    write_image_folder(tmp_path / "toy", mode=mode, fmt=fmt)
    ds = load_dataset("toy", tmp_path)
    channels = 3 if mode == "RGB" else 1
    assert ds.train.images.shape == (18, channels, 32, 32)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert sorted(ds.train.labels.tolist()) == [0] * 6 + [1] * 6 + [2] * 6
    # root may also point at the data set folder itself
    assert torch.equal(load_dataset("whatever", tmp_path / "toy").train.images, ds.train.images)


def test_dataset_info_is_what_loading_gives_without_loading(tmp_path):
    write_image_folder(tmp_path / "toy", classes=5, size=40, mode="L", fmt="jpg")
    splits = load_splits("toy", tmp_path)
    assert dataset_info("toy", tmp_path) == DatasetInfo(5, (1, 40, 40)) == DatasetInfo(splits.num_classes,
                                                                                      splits.input_shape)
    assert dataset_info("whatever", tmp_path / "toy") == DatasetInfo(5, (1, 40, 40))  # root at the folder itself
    synthetic = load_splits("synthetic")
    assert dataset_info("synthetic") == DatasetInfo(synthetic.num_classes, synthetic.input_shape)
    # CIFAR: known without the files (checks before a download)
    assert dataset_info("cifar10", tmp_path) == DatasetInfo(10, (3, 32, 32))
    assert dataset_info("cifar100", tmp_path) == DatasetInfo(100, (3, 32, 32))
    with pytest.raises(DataError, match="not found"):
        dataset_info("nope", tmp_path)


def test_second_load_hits_the_cache(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "toy", per_class=40)
    first = load_dataset("toy", tmp_path)
    import pruning_env.core.data as data

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode", boom)
    second = load_dataset("toy", tmp_path)
    assert torch.equal(first.train.images, second.train.images)


def test_env_var_is_used(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "toy")
    monkeypatch.setenv("PRUNING_ENV_DATA", str(tmp_path))
    assert len(load_dataset("toy").train) == 18


def test_split_is_deterministic_stratified_and_disjoint():
    ds = make_synthetic(num_classes=4, n_train=400, n_test=40, seed=3)
    a, b = ds.splits(0.1, seed=0), ds.splits(0.1, seed=0)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert len(a.train) + len(a.val) == 400
    assert torch.bincount(a.val.labels).tolist() == [10, 10, 10, 10]
    c = ds.splits(0.1, seed=1)
    assert not torch.equal(a.val.images, c.val.images)
    # no validation image is also a training image
    flat_train = {bytes(x.numpy()) for x in a.train.images}
    assert not any(bytes(x.numpy()) in flat_train for x in a.val.images)


def test_missing_data_error_says_where_and_what(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "nowhere" in msg and "PRUNING_ENV_DATA" in msg and "train/<class>" in msg


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="Offline.*PRUNING_ENV_DATA"):
        load_dataset("cifar10", tmp_path, download=True)


def test_corrupt_data_errors(tmp_path):
    write_image_folder(tmp_path / "toy")
    (tmp_path / "toy" / "train" / "class_0" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot decode.*0000.png"):
        load_dataset("toy", tmp_path)
    folder = _write_cifar_python(tmp_path / "c")
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt"):
        load_dataset("cifar10", tmp_path / "c", download=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing"):
        load_dataset("cifar10", tmp_path / "c", download=False, use_cache=False)


def test_augment_is_a_crop_and_flip_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(x, gen, padding=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        found = any(
            torch.equal(out[i], cand)
            for dy in range(5)
            for dx in range(5)
            for cand in (padded[i, :, dy:dy + 8, dx:dx + 8], padded[i, :, dy:dy + 8, dx:dx + 8].flip(2))
        )
        assert found
    again = augment(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again)


def test_cutout_zeroes_one_square_per_image_and_nothing_else():
    x = torch.full((64, 3, 16, 16), 7, dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(1), padding=0, cutout=6)
    holes = (out == 0).all(1)  # (B, H, W): zeroed in every channel
    assert torch.equal(out == 0, holes[:, None].expand_as(out))  # a whole pixel or nothing
    assert ((out == 0) | (out == 7)).all()
    areas = holes.sum((1, 2))
    assert int(areas.max()) == 36 and int(areas.min()) > 0  # full squares inside, clipped at borders
    for i in range(64):  # each hole is a rectangle (a clipped square)
        rows, cols = holes[i].any(1).nonzero(), holes[i].any(0).nonzero()
        assert int(areas[i]) == len(rows) * len(cols) and len(rows) <= 6 and len(cols) <= 6
    no_cut = augment(x, torch.Generator().manual_seed(1), padding=0)
    assert (no_cut == 7).all()
    with pytest.raises(ValueError, match="cutout must be >= 0"):
        next(batches(make_synthetic(n_train=8, n_test=2).splits(0.25).train, 4, mean=(0.5,) * 3, std=(0.5,) * 3,
                     augment_data=True, generator=torch.Generator(), cutout=-1))


def test_batches_crop_padding_sets_the_crop_range():
    split = make_synthetic(n_train=64, n_test=4).splits(0.25).train
    kw = dict(mean=(0.0,) * 3, std=(1 / 255,) * 3, augment_data=True)
    plain = next(batches(split, 48, mean=(0.0,) * 3, std=(1 / 255,) * 3))[0]
    no_crop = next(batches(split, 48, **kw, generator=torch.Generator().manual_seed(0), padding=0))[0]
    for i in range(48):  # without padding only the flip is left
        assert torch.equal(no_crop[i], plain[i]) or torch.equal(no_crop[i], plain[i].flip(2))
    assert not all(torch.equal(no_crop[i], plain[i]) for i in range(48))  # some images are flipped
    cropped = next(batches(split, 48, **kw, generator=torch.Generator().manual_seed(0), padding=1))[0]
    # a 1-pixel shift leaves a zero border on some images, never one wider than a pixel
    zero_rows = (cropped == 0).all(1).all(2)  # (B, H)
    assert zero_rows.any() and not zero_rows[:, 1:-1].any()
    with pytest.raises(ValueError, match="padding must be >= 0"):
        next(batches(split, 4, **kw, generator=torch.Generator(), padding=-1))


def test_batch_augmentation_stacks_independent_copies_of_each_batch():
    split = make_synthetic(n_train=64, n_test=4).splits(0.25).train
    kw = dict(mean=(0.0,) * 3, std=(1 / 255,) * 3)
    plain_x, plain_y = next(batches(split, 16, **kw))
    x, y = next(batches(split, 16, **kw, augment_data=True, generator=torch.Generator().manual_seed(3),
                        padding=0, copies=3))
    assert x.shape == (48, *plain_x.shape[1:]) and torch.equal(y, plain_y.repeat(3))
    for k in range(3):  # each block is a flip-or-not of the same 16 images
        for i in range(16):
            xi = x[16 * k + i]
            assert torch.equal(xi, plain_x[i]) or torch.equal(xi, plain_x[i].flip(2))
    flipped = torch.tensor([[not torch.equal(x[16 * k + i], plain_x[i]) for i in range(16)] for k in range(3)])
    assert not (flipped[0] == flipped[1]).all()  # the copies are augmented independently
    with pytest.raises(ValueError, match="copies must be >= 1"):
        next(batches(split, 4, **kw, augment_data=True, generator=torch.Generator(), copies=0))
    with pytest.raises(ValueError, match="only with augment_data"):
        next(batches(split, 4, **kw, copies=2))


def test_batches_normalise_and_cover_the_split():
    ds = make_synthetic(n_train=50, n_test=10)
    sp = ds.splits(0.2)
    seen = 0
    for x, y in batches(sp.train, 16, mean=sp.mean, std=sp.std, shuffle=True, augment_data=True,
                        generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        seen += len(y)
    assert seen == len(sp.train)
    with pytest.raises(ValueError, match="Generator"):
        next(batches(sp.train, 4, mean=sp.mean, std=sp.std, shuffle=True))


@pytest.mark.cifar
@requires_cifar
def test_real_cifar10_loads_from_the_decoded_cache_the_second_time(monkeypatch):
    first = load_splits("cifar10", cifar_root())

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again instead of reading the cache")

    monkeypatch.setattr(data_module, "_decode", no_decoding)
    sp = load_splits("cifar10", cifar_root())
    assert (len(sp.train), len(sp.val), len(sp.test)) == (45000, 5000, 10000)
    assert sp.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.equal(sp.train.images, first.train.images) and torch.equal(sp.test.labels, first.test.labels)


def test_prefixes_of_every_split_cover_all_classes():
    ds = make_synthetic(num_classes=4, n_train=400, n_test=200, seed=0)
    # make the official test split class-sorted, as image folders are
    order = torch.argsort(ds.test.labels, stable=True)
    ds.test.images, ds.test.labels = ds.test.images[order], ds.test.labels[order]
    sp = ds.splits(0.1, seed=0)
    for split in (sp.train, sp.val, sp.test):
        assert set(split.subset(40).labels.tolist()) == {0, 1, 2, 3}
    assert sorted(sp.test.labels.tolist()) == sorted(ds.test.labels.tolist())
