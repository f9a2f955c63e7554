"""Image sources as arrays: scikit-learn's bundled digits, MNIST idx files, CIFAR-10
python batches, and image folders. Images come out uint8 [N, H, W, C], labels int64 [N].
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np

# the project's folder sits beside shared/ (…/main/pipeline/io/datasets.py → …/shared/data/mnist)
DEFAULT_MNIST_DIR = os.environ.get("ADVPURE_MNIST_DIR",
                                   str(Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"))

# Official checksums of the MNIST test set (as distributed in gzip form).
MNIST_TEST_FILES = {
    "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


class DatasetError(RuntimeError):
    pass


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 bundled 8×8 handwritten digits (pixel values 0–16 → 0–255)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return images, d.target.astype(np.int64)


def _open_idx(path: Path):
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    raise DatasetError(f"MNIST file not found: {path} (or {gz.name})")


def _read_idx(path: Path) -> np.ndarray:
    with _open_idx(path) as f:
        data = f.read()
    if len(data) < 4:
        raise DatasetError(f"{path}: too short for an idx file")
    zero, dtype_code, ndim = data[0] << 8 | data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: holds {body.size} bytes of data, header says {dims}")
    return body.reshape(dims)


def load_mnist(directory: str | None = None, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from idx files (plain or .gz): images uint8 [N, 28, 28, 1], labels int64 [N]."""
    d = Path(directory or DEFAULT_MNIST_DIR)
    images = _read_idx(d / f"{split}-images-idx3-ubyte")
    labels = _read_idx(d / f"{split}-labels-idx1-ubyte").astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{d}: {len(images)} images but {len(labels)} labels")
    return images[..., None], labels


def mnist_available(directory: str | None = None) -> bool:
    d = Path(directory or DEFAULT_MNIST_DIR)
    return all((d / n).exists() or (d / f"{n}.gz").exists() for n in MNIST_TEST_FILES)


def verify_mnist_test(directory: str | None = None) -> None:
    """Check the gzip files against the official checksums."""
    d = Path(directory or DEFAULT_MNIST_DIR)
    for name, digest in MNIST_TEST_FILES.items():
        got = hashlib.sha256((d / f"{name}.gz").read_bytes()).hexdigest()
        if got != digest:
            raise DatasetError(f"{d / name}.gz: sha256 {got} is not the official {digest}")


def load_cifar10(directory: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 python batches (data_batch_1..5 / test_batch): uint8 [N, 32, 32, 3]."""
    d = Path(directory)
    names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    xs, ys = [], []
    for n in names:
        p = d / n
        if not p.exists():
            raise DatasetError(f"CIFAR-10 batch not found: {p}")
        with open(p, "rb") as f:
            # The official CIFAR-10 python batches are pickles of plain dicts of arrays and lists.
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class _RestrictedUnpickler(pickle.Unpickler):
    """Only numpy arrays and builtins: a CIFAR batch must not run arbitrary code."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def iter_image_folder(directory: str):
    """(relative path, PIL image, class index, class names) for root/<class>/<image> files."""
    from PIL import Image

    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders")
    for ci, cname in enumerate(classes):
        for p in sorted((root / cname).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(p) as im:
                    yield str(p.relative_to(root)), im.copy(), ci, classes


def to_float_nchw(images: np.ndarray):
    """uint8 [N, H, W, C] → torch float32 [N, C, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.array(images.transpose(0, 3, 1, 2), copy=True)).float().div_(255.0)


# ---------------------------------------------------------------------------- named splits

MNIST_FIT = 8000  # our split of the 10,000 MNIST test images when the train set is absent


def split_indices(source: str, split: str, n: int) -> np.ndarray:
    """Indices of a named split. digits: every 5th sample is `test`, the rest `train`.
    mnist: `t10k` all test images, `t10k-fit` the first 8,000 (to train our small models when
    the official train set is absent), `t10k-holdout` the last 2,000; `train` the train files."""
    idx = np.arange(n)
    table = {
        ("digits", "test"): idx[idx % 5 == 0], ("digits", "train"): idx[idx % 5 != 0], ("digits", "all"): idx,
        ("mnist", "t10k"): idx, ("mnist", "t10k-fit"): idx[:MNIST_FIT], ("mnist", "t10k-holdout"): idx[MNIST_FIT:],
        ("mnist", "train"): idx, ("cifar10", "test"): idx, ("cifar10", "train"): idx,
    }
    if (source, split) not in table:
        options = sorted(s for src, s in table if src == source)
        raise DatasetError(f"{source} has no split {split!r}; choose one of {options}")
    return table[(source, split)]


def load_split(source: str, split: str, path: str | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(images uint8 NHWC, labels, original indices) of a named split."""
    if source == "digits":
        images, labels = load_digits()
    elif source == "mnist":
        images, labels = load_mnist(path, split="train" if split == "train" else "t10k")
    elif source == "cifar10":
        if not path:
            raise DatasetError("cifar10 needs a path to the cifar-10-batches-py folder")
        images, labels = load_cifar10(path, split=split)
    else:
        raise DatasetError(f"unknown source {source!r}")
    idx = split_indices(source, split, len(images))
    return images[idx], labels[idx], idx.tolist()


# ---------------------------------------------------------------------------- ImageNet

IMAGENET_RESIZE, IMAGENET_CROP = 256, 224


def imagenet_preprocess(im, resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP) -> np.ndarray:
    """The standard evaluation transform, as torchvision's Resize(256) + CenterCrop(224) on a
    PIL image: shorter side to `resize` (bilinear, the long side truncated as torchvision
    does), then the centre crop×crop. RGB uint8 [crop, crop, 3] (grayscale/CMYK → RGB)."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if size != (w, h):
        im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    if w < crop or h < crop:
        raise DatasetError(f"image of {w}×{h} after resizing is smaller than the {crop}×{crop} crop")
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _read_classes(path: str | None, found: list[str]) -> list[str]:
    """The class order: the file's first token per line (e.g. LOC_synset_mapping.txt), else
    the sorted WordNet ids found (1,000 for the full validation set)."""
    if path:
        classes = [ln.split()[0] for ln in Path(path).read_text().splitlines() if ln.strip()]
        missing = sorted(set(found) - set(classes))
        if missing:
            raise DatasetError(f"{path}: does not list {len(missing)} class(es) found, e.g. {missing[0]}")
        return classes
    return sorted(set(found))


def _read_ground_truth(path: str) -> dict[str, str | int]:
    """{image stem: WordNet id or class index} from LOC_val_solution.csv (ImageId,
    PredictionString: the first token is the wnid) or lines `<file> <wnid | index>`."""
    text = Path(path).read_text().splitlines()
    out: dict[str, str | int] = {}
    if text and text[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for ln in text[1:]:
            if ln.strip():
                name, pred = ln.split(",", 1)
                out[Path(name.strip()).stem] = pred.split()[0]
        return out
    for i, ln in enumerate(text):
        parts = ln.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DatasetError(f"{path}:{i + 1}: expected `<file> <wnid or class index>` (a devkit ground-truth "
                               "file lists ILSVRC ids only: convert it with the devkit's meta.mat first)")
        out[Path(parts[0]).stem] = int(parts[1]) if parts[1].isdigit() else parts[1]
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def imagenet_listing(directory: str, labels: str | None = None,
                     classes: str | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(image file, class index)] and the class names (WordNet ids) of a validation folder:
    class sub-folders named by WordNet id, or a flat folder plus a ground-truth file."""
    root = Path(directory)
    if not root.is_dir():
        raise DatasetError(f"ImageNet folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if subdirs and not labels:
        names = _read_classes(classes, [d.name for d in subdirs])
        index = {c: i for i, c in enumerate(names)}
        return [(f, index[d.name]) for d in subdirs for f in _image_files(d)], names
    if not labels:
        raise DatasetError(f"{root}: no class sub-folders; a flat folder needs --labels (ground-truth file)")
    truth = _read_ground_truth(labels)
    files = _image_files(root)
    unlabelled = [f.name for f in files if f.stem not in truth]
    if unlabelled:
        raise DatasetError(f"{labels}: no label for {len(unlabelled)} image(s), e.g. {unlabelled[0]}")
    wnids = [v for v in truth.values() if isinstance(v, str)]
    names = _read_classes(classes, wnids) if wnids or classes else []
    index = {c: i for i, c in enumerate(names)}
    return [(f, index[truth[f.stem]] if isinstance(truth[f.stem], str) else int(truth[f.stem])) for f in files], names


def iter_imagenet(directory: str, labels: str | None = None, classes: str | None = None,
                  resize: int = IMAGENET_RESIZE, crop: int = IMAGENET_CROP):
    """(key, uint8 [crop, crop, 3], class index, class names), one image decoded at a time."""
    from PIL import Image

    files, names = imagenet_listing(directory, labels, classes)
    for path, label in files:
        with Image.open(path) as im:
            yield path.stem, imagenet_preprocess(im, resize, crop), label, names
