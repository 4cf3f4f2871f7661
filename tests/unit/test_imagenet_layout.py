import errno

import pytest

from alexnet.config import UsageError
from alexnet.imagenet import detect_layout, read_synset_names, read_val_labels
from alexnet.sample import SampleConfig, make_sample, wnid


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "root"
    make_sample(SampleConfig(output=root, num_classes=3, train_per_class=2, val_per_class=1))
    return root


def test_class_index_is_sorted_wnids_and_flat_val_is_detected(tree, tmp_path):
    layout = detect_layout(tree, tmp_path / "out")
    assert list(layout.wnids) == sorted(wnid(k) for k in range(3))
    assert layout.val == "flat" and layout.val_labels.name == "LOC_val_solution.csv"
    assert set(read_val_labels(layout.val_labels).values()) == set(layout.wnids)
    assert read_synset_names(tree)[wnid(0)] == "sample class 0"


def test_folder_val_is_detected(tmp_path):
    root = tmp_path / "root"
    make_sample(SampleConfig(output=root, num_classes=2, train_per_class=1, val_per_class=1, val_layout="folders"))
    assert detect_layout(root, tmp_path / "out").val == "folders"


def test_missing_val_is_allowed(tmp_path):
    (tmp_path / "root" / "train" / "n1").mkdir(parents=True)
    (tmp_path / "root" / "train" / "n1" / "a.JPEG").write_bytes(b"x")
    assert detect_layout(tmp_path / "root", tmp_path / "out").val is None


def test_label_file_errors(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("Image,Label\nx,y\n")
    with pytest.raises(UsageError, match="header"):
        read_val_labels(bad)
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError):
        read_val_labels(bad)


def test_a_read_that_fails_transiently_is_retried_and_a_lasting_failure_names_the_tries(tmp_path):
    from alexnet.imagenet import READ_TRIES, read_with_retries

    class Flaky(type(tmp_path)):  # a real file behind a network mount that answers EIO twice
        fails = 2

        def read_bytes(self):
            if Flaky.fails:
                Flaky.fails -= 1
                raise OSError(errno.EIO, "Input/output error")
            return super().read_bytes()

    (tmp_path / "a.JPEG").write_bytes(b"jpeg")
    assert read_with_retries(Flaky(tmp_path / "a.JPEG"), pause_s=0.01) == b"jpeg" and Flaky.fails == 0
    Flaky.fails = 99
    with pytest.raises(OSError, match=f"unreadable after {READ_TRIES} tries: Input/output error"):
        read_with_retries(Flaky(tmp_path / "a.JPEG"), pause_s=0.01)
    with pytest.raises(OSError, match="unreadable: No such file"):  # nothing to retry
        read_with_retries(tmp_path / "missing.JPEG", pause_s=0.01)
