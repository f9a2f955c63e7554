"""pipeline.io.datasets: the dataset loaders."""
from __future__ import annotations

import pickle

import pytest

from pipeline.io import datasets


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    src = tmp_path / "c"
    src.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(src / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(datasets.DatasetError, match="refusing to unpickle"):
        datasets.load_cifar10(str(src))
