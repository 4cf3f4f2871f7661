import numpy as np

from alexnet.stats import PixelMoments


def test_moments_equal_numpy_and_merge_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    a, b = PixelMoments.zeros(16), PixelMoments.zeros(16)
    for i, img in enumerate(images):
        (a if i < 3 else b).add(img)
    b.save(tmp_path / "b.npz")
    a.merge(PixelMoments.load(tmp_path / "b.npz"))

    np.testing.assert_allclose(a.mean_image(), images.mean(axis=0), atol=1e-4)
    x = images.reshape(-1, 3) / 255.0
    pca = a.pca()
    np.testing.assert_allclose(pca["covariance"], np.cov(x, rowvar=False, bias=True), atol=1e-12)
    np.testing.assert_allclose(pca["mean_rgb"], x.mean(axis=0), atol=1e-12)
    vals, vecs = np.asarray(pca["eigenvalues"]), np.asarray(pca["eigenvectors"])
    assert (np.diff(vals) <= 0).all()
    np.testing.assert_allclose(np.asarray(pca["covariance"]) @ vecs, vecs * vals, atol=1e-12)
    assert pca["pixel_count"] == 7 * 256
