import io
import hashlib

from PIL import Image

from alexnet.sample import SampleConfig, make_sample


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed_with_quirks(tmp_path):
    cfg = dict(num_classes=4, train_per_class=3, val_per_class=2, broken=4)
    m1 = make_sample(SampleConfig(output=tmp_path / "a", seed=5, **cfg))
    make_sample(SampleConfig(output=tmp_path / "b", seed=5, **cfg))
    make_sample(SampleConfig(output=tmp_path / "c", seed=6, **cfg))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    formats = {}
    for rel, kind in m1["quirks"].items():
        with Image.open(io.BytesIO((tmp_path / "a" / rel).read_bytes())) as img:
            formats[kind] = (img.format, img.mode)
        assert rel.endswith(".JPEG")
    assert formats["cmyk"] == ("JPEG", "CMYK")
    assert formats["grey"] == ("JPEG", "L")
    assert formats["png_named_jpeg"][0] == "PNG"
    assert formats["grey16_png"][1].startswith("I")
    assert len(m1["broken"]) == 5


def test_sizes_vary_within_bounds(tmp_path):
    make_sample(SampleConfig(output=tmp_path / "s", num_classes=2, train_per_class=20, val_per_class=0, quirks=False))
    sizes = {Image.open(p).size for p in (tmp_path / "s" / "train").rglob("*.JPEG")}
    assert len(sizes) > 10
    assert all(60 <= s <= 500 for wh in sizes for s in wh)
