"""Micrograph I/O and the 2D preprocessing steps and chains, on small synthetic images."""
import cv2
import mrcfile
import numpy as np
import pytest

from cryopick_plugin.engine.pick2d import micrograph_io as mio
from cryopick_plugin.engine.pick2d import preprocess as pp
from cryopick_plugin.engine.errors import InputError


def _disk_image(shape=(96, 96), centre=(48, 48), radius=14, value=1.0):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) <= radius ** 2).astype(np.float32) * value


# ---------------------------------------------------------------------------------------------- I/O

def test_rgb_image_is_refused_with_the_file_name(tmp_path):
    path = tmp_path / 'colour.png'
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(path), rgb)
    with pytest.raises(InputError) as err:
        mio.read_micrograph(path)
    assert str(path) in str(err.value) and 'RGB' in str(err.value) and 'greyscale' in str(err.value)


def test_read_formats_keep_orientation_and_range(tmp_path):
    img = np.zeros((40, 50), np.uint16)
    img[5, 30] = 60000  # row 5, column 30: x = 30, y = 5
    img[20:, :] += 100
    cv2.imwrite(str(tmp_path / 'a.png'), img)
    out, pixel = mio.read_micrograph(tmp_path / 'a.png')
    assert pixel is None and out.dtype == np.float32 and out.shape == (40, 50)
    assert out[5, 30] == 60000 and out.max() == 60000
    mio.write_micrograph(tmp_path / 'b.mrc', out, 1.77)
    back, pixel = mio.read_micrograph(tmp_path / 'b.mrc')
    assert pixel == pytest.approx(1.77) and np.array_equal(back, out)
    with mrcfile.open(tmp_path / 'b.mrc') as m:
        assert m.data[5, 30] == 60000  # the MRC array frame is the one we read
    mio.write_micrograph(tmp_path / 'c.jpg', out)
    assert mio.read_micrograph(tmp_path / 'c.jpg')[0].shape == (40, 50)


def test_bad_micrographs_raise_input_error(tmp_path):
    with pytest.raises(InputError, match='not found'):
        mio.read_micrograph(tmp_path / 'missing.mrc')
    with mrcfile.new(tmp_path / 'vol.mrc') as m:
        m.set_data(np.random.default_rng(1).random((4, 8, 8)).astype(np.float32))
    with pytest.raises(InputError, match='2D'):
        mio.read_micrograph(tmp_path / 'vol.mrc')
    cv2.imwrite(str(tmp_path / 'flat.png'), np.full((8, 8), 7, np.uint8))
    with pytest.raises(InputError, match='constant'):
        mio.read_micrograph(tmp_path / 'flat.png')
    (tmp_path / 'junk.jpg').write_bytes(b'not an image')
    with pytest.raises(InputError, match='readable'):
        mio.read_micrograph(tmp_path / 'junk.jpg')


def test_downsample_area_is_binning_and_coordinates_map_back():
    rng = np.random.default_rng(2)
    img = rng.random((64, 48)).astype(np.float32)
    small = mio.downsample(img, 4)
    assert small.shape == (16, 12)
    assert np.allclose(small, img.reshape(16, 4, 12, 4).mean(axis=(1, 3)), atol=1e-5)
    four = mio.downsample(img, 4, method='fourier')
    assert four.shape == (16, 12) and four.mean() == pytest.approx(img.mean(), abs=1e-4)
    # A blob at (x=37, y=21) in the original is found back at the same place from the small image.
    blob = _disk_image((128, 128), (37, 21), 6)
    for method in ('area', 'fourier'):
        s = mio.downsample(cv2.GaussianBlur(blob, (0, 0), 3), 4, method)
        yy, xx = np.unravel_index(np.argmax(s), s.shape)
        back = mio.to_original_coordinates([[xx, yy]], s.shape, blob.shape, method)[0]
        assert np.abs(back - [37, 21]).max() <= 2.5
        assert np.allclose(mio.to_small_coordinates(back, s.shape, blob.shape, method), [[xx, yy]])
    with pytest.raises(InputError):
        mio.downsample(img, 0.5)


# ---------------------------------------------------------------------------------------------- steps

def test_wiener_deconvolution_sharpens_a_blurred_disk_without_shift():
    disk = _disk_image()
    psf = pp.gaussian_psf(9, 3.0)
    blurred = cv2.filter2D(disk, -1, psf.astype(np.float32), borderType=cv2.BORDER_REFLECT)
    sharp = pp.wiener_deconvolve(blurred, psf, balance=1e-3)
    err_blur = np.abs(blurred - disk).mean()
    err_sharp = np.abs(sharp - disk).mean()
    assert err_sharp < 0.85 * err_blur
    edge = lambda im: np.abs(np.diff(im[48])).max()  # noqa: E731
    assert edge(sharp) > 2.5 * edge(blurred)
    # The reference's large balance smooths, and a centred PSF shifts nothing.
    smooth = pp.wiener_deconvolve(disk, psf, balance=30.0)
    assert edge(smooth / smooth.max()) < edge(disk)
    off = _disk_image(centre=(30, 61), radius=5)
    out = pp.wiener_deconvolve(off, psf, balance=30.0)
    assert np.unravel_index(np.argmax(out), out.shape) == (61, 30)


def test_clahe_raises_local_contrast():
    rng = np.random.default_rng(3)
    img = np.zeros((128, 128), np.float32)
    img[:, 64:] = 200
    texture = cv2.GaussianBlur(rng.normal(0, 1, (128, 64)).astype(np.float32), (0, 0), 3)
    img[:, :64] += 5 * pp.minmax01(texture)  # faint texture in the dark half
    out = pp.clahe(img, 2.0, 4)
    # Texture contrast relative to the whole intensity range grows at least twofold.
    assert out[:, :64].std() / 255 > 2 * img[:, :64].std() / img.max()


def test_guided_filter_keeps_the_edge_and_smooths_the_noise():
    rng = np.random.default_rng(4)
    step = np.zeros((80, 80), np.float32)
    step[:, 40:] = 1.0
    noisy = step + rng.normal(0, 0.1, step.shape).astype(np.float32)
    out = pp.guided_filter(noisy, None, box=9, eps=0.05)
    assert out[:, 5:30].std() < 0.5 * noisy[:, 5:30].std()
    box = cv2.blur(noisy, (9, 9))
    # 2 px either side of the edge the guided output still holds most of the step, a box blur does not.
    jump = lambda im: im[:, 42].mean() - im[:, 37].mean()  # noqa: E731
    assert jump(out) > 0.8 and jump(out) > jump(box) + 0.1


def test_nlmeans_reduces_noise():
    rng = np.random.default_rng(5)
    img = np.clip(128 + rng.normal(0, 15, (64, 64)), 0, 255).astype(np.float32)
    out = pp.nlmeans(img, h=15)
    assert out.std() < 0.5 * img.std()
    assert abs(out.mean() - img.mean()) < 3


# --------------------------------------------------------------------------------------------- chains

@pytest.mark.parametrize('chain,switches', [('cryosegnet', pp.CRYOSEGNET_SWITCHES),
                                            ('deepcryopicker', pp.DEEPCRYOPICKER_SWITCHES)])
def test_chain_switches_switch_and_keep_orientation(chain, switches):
    rng = np.random.default_rng(6)
    img = rng.normal(0, 1, (96, 112)).astype(np.float32)
    img += 4 * _disk_image((96, 112), (20, 15), 8)  # bright blob top left
    full, stages = pp.run_chain(img, chain, keep_stages=True)
    assert full.shape == img.shape and full.dtype == np.float32
    assert full.min() >= 0 and full.max() <= 1
    names = [s[0] for s in stages]
    assert names[0] == 'input' and names[-1] == 'result'
    # No flip: the blob stays top left.
    assert full[10:20, 12:28].mean() > full[76:86, 84:100].mean()
    for name in switches:
        off, off_stages = pp.run_chain(img, chain, keep_stages=True, **{name: False})
        assert name not in [s[0] for s in off_stages]
        if name == 'normalise':
            continue  # min–max (mat2gray) changes nothing that the scale-free steps after it see
        assert not np.allclose(off, full, atol=1e-3), name
    assert pp.run_chain(img, chain)[1] == []
    with pytest.raises(InputError):
        pp.run_chain(img, chain, sharpen=True)


def test_chain_functions_match_run_chain_and_binning():
    rng = np.random.default_rng(7)
    img = rng.normal(0, 1, (64, 64)).astype(np.float32)
    assert np.allclose(pp.cryosegnet_chain(img, wiener=False), pp.run_chain(img, 'cryosegnet', wiener=False)[0])
    assert np.allclose(pp.deepcryopicker_chain(img), pp.run_chain(img, 'deepcryopicker')[0])
    assert pp.run_chain(img, 'deepcryopicker', bin_factor=2)[0].shape == (32, 32)
    with pytest.raises(InputError):
        pp.run_chain(img, 'nope')
