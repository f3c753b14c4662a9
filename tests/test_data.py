"""Datasets, joint transforms and the synthetic generator."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from pyseg.data import (CamVidDataset, CityscapesDataset, DatasetError, FolderDataset, VOCDataset, build_dataset,
                        build_eval_transform, build_train_transform, get_palette)
from pyseg.data.labels import CITYSCAPES_LABEL_IDS, cityscapes_lut, voc_palette
from pyseg.data.synthetic import SYNTHETIC_CLASSES, generate, main as synth_main


def _save_rgb(path, h=6, w=8, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _save_mask(path, arr, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))  # mode L
    if palette is not None:
        im = im.convert("P")  # keeps the indices; the palette gives them VOC colours
        im.putpalette([c for rgb in palette for c in rgb])
    im.save(path)


def test_cityscapes_lut_and_layout(tmp_path):
    lut = cityscapes_lut()
    assert [int(lut[i]) for i in CITYSCAPES_LABEL_IDS] == list(range(19))
    assert (np.delete(lut, CITYSCAPES_LABEL_IDS) == 255).all()
    img = _save_rgb(tmp_path / "leftImg8bit/val/aachen/a_000001_000019_leftImg8bit.png")
    raw = np.array([[7, 8, 0, 33, 26, 1, 4, 24]] * 6, dtype=np.uint8)
    _save_mask(tmp_path / "gtFine/val/aachen/a_000001_000019_gtFine_labelIds.png", raw)
    ds = CityscapesDataset(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 19
    x, y = ds[0]
    assert isinstance(x, tv_tensors.Image) and isinstance(y, tv_tensors.Mask)
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(img))
    assert y.dtype == torch.int64
    assert y[0].tolist() == [0, 1, 255, 18, 13, 255, 255, 11]


def test_camvid_layout_void(tmp_path):
    _save_rgb(tmp_path / "train/0001TP_006690.png")
    m = np.tile(np.arange(12, dtype=np.uint8), (6, 1))[:, :8]
    m[0, 0] = 11
    _save_mask(tmp_path / "trainannot/0001TP_006690.png", m)
    ds = CamVidDataset(tmp_path, "train")
    assert ds.num_classes == 11
    assert ds[0][1][0, 0] == 255 and ds[0][1][1, 3] == 3
    ds12 = CamVidDataset(tmp_path, "train", void_as_class=True)
    assert ds12.num_classes == 12 and ds12[0][1][0, 0] == 11


def test_voc_palette_masks_and_trainaug(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000032\n")
    (root / "ImageSets/Segmentation/trainaug.txt").write_text("2007_000032\n2008_000001\n")
    for i in ("2007_000032", "2008_000001"):
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
    m = np.zeros((6, 8), np.uint8)
    m[1, 1], m[2, 2] = 15, 255
    _save_mask(root / "SegmentationClass/2007_000032.png", m, palette=voc_palette())
    assert Image.open(root / "SegmentationClass/2007_000032.png").mode == "P"
    ds = VOCDataset(tmp_path, "val")
    y = ds[0][1]
    assert y[1, 1] == 15 and y[2, 2] == 255 and y[0, 0] == 0 and ds.num_classes == 21
    for i in ("2007_000032", "2008_000001"):
        _save_mask(root / f"SegmentationClassAug/{i}.png", np.full((6, 8), 3, np.uint8))
    aug = build_dataset("voc", tmp_path, "trainaug")
    assert len(aug) == 2 and int(aug[1][1][0, 0]) == 3


def test_folder_dataset_and_out_of_range_labels(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    _save_rgb(tmp_path / "images/a.png")
    _save_mask(tmp_path / "masks/a.png", np.array([[0, 1, 2, 255] * 2] * 6))
    ds = FolderDataset(tmp_path)
    assert ds.classes == ("bg", "fg")
    assert ds[0][1][0, :4].tolist() == [0, 1, 255, 255]
    with pytest.raises(DatasetError, match="split folder not found"):
        FolderDataset(tmp_path, "train")


def test_missing_mask_names_the_file(tmp_path):
    _save_rgb(tmp_path / "leftImg8bit/train/c/x_leftImg8bit.png")
    with pytest.raises(DatasetError, match=r"mask file not found: .*x_gtFine_labelIds\.png"):
        CityscapesDataset(tmp_path, "train")


def test_corrupt_image_names_the_file(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    _save_mask(tmp_path / "masks/bad.png", np.zeros((6, 8)))
    ds = FolderDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"cannot read image file .*bad\.png"):
        ds[0]


def test_truncated_mask_and_size_mismatch_name_the_file(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    _save_rgb(tmp_path / "images/a.png")
    _save_rgb(tmp_path / "images/b.png")
    _save_mask(tmp_path / "masks/a.png", np.zeros((6, 8)))
    data = (tmp_path / "masks/a.png").read_bytes()
    (tmp_path / "masks/a.png").write_bytes(data[: len(data) // 2])
    _save_mask(tmp_path / "masks/b.png", np.zeros((5, 8)))
    ds = FolderDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"mask file .*a\.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"mask file .*b\.png is 8x5"):
        ds[1]


def test_rgb_mask_rejected(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\n")
    _save_rgb(tmp_path / "images/a.png")
    _save_rgb(tmp_path / "masks/a.png")
    with pytest.raises(DatasetError, match=r"a\.png has mode 'RGB'"):
        FolderDataset(tmp_path)[0]


def test_unknown_dataset_type():
    with pytest.raises(ValueError, match="unknown dataset type 'coco'"):
        build_dataset("coco", "/nonexistent", "train")


def _pair(h=20, w=30):
    img = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    # mask encodes the pixel's column so that geometric consistency with the image can be checked
    mask = tv_tensors.Mask(torch.randint(0, 4, (h, w)))
    return img, mask


def test_train_transform_joint_geometry():
    torch.manual_seed(1)
    h, w = 20, 30
    # image = mask value replicated: any joint geometric transform keeps them aligned (nearest for both
    # would be exact; the image is bilinear, so use flips/crops/pads only here)
    mask = torch.randint(0, 4, (h, w))
    img = tv_tensors.Image((mask * 60).to(torch.uint8).expand(3, h, w).clone())
    t = build_train_transform(crop_size=(24, 40), scale_p=0.0, hflip=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    flips = 0
    for _ in range(20):
        x, y = t(img, tv_tensors.Mask(mask))
        assert x.shape == (3, 24, 40) and y.shape == (24, 40) and y.dtype == torch.int64
        pad = y == 255
        assert pad.sum() == 24 * 40 - h * w  # padding is exactly the area the image does not cover
        assert (x[:, pad] == 0).all()
        assert torch.allclose(x[0][~pad], (y[~pad] * 60).float() / 255)
        flips += int(torch.equal(y[~pad].view(h, w), mask.flip(-1)))
    assert 0 < flips < 20


def test_train_transform_scale_and_photometric():
    torch.manual_seed(0)
    img, mask = _pair(32, 48)
    t = build_train_transform(crop_size=None, scale_range=(0.5, 2.0), scale_p=1.0, hflip=0.0, color_jitter=0.4,
                              noise_std=0.05)
    sizes = set()
    for _ in range(6):
        x, y = t(img, mask)
        assert x.dtype == torch.float32 and x.shape[-2:] == y.shape
        assert set(y.unique().tolist()) <= {0, 1, 2, 3}  # nearest: no new label values, photometric untouched
        sizes.add(tuple(y.shape))
    assert len(sizes) > 1
    assert all(16 <= s[0] <= 64 for s in sizes)
    t0 = build_train_transform(crop_size=None, scale_p=0.0, hflip=0.0)
    x, y = t0(img, mask)
    assert torch.equal(y, mask.as_subclass(torch.Tensor))


def test_eval_transform_normalises_and_pads():
    img, mask = _pair(20, 30)
    x, y = build_eval_transform(size_divisor=16)(img, mask)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert torch.equal(y[:20, :30], mask.as_subclass(torch.Tensor))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(x[:, :20, :30], (img.float() / 255 - mean) / std, atol=1e-5)


def test_palette():
    p = get_palette("cityscapes", 19)
    assert p.shape == (256, 3) and tuple(p[0]) == (128, 64, 128) and tuple(p[255]) == (0, 0, 0)
    assert tuple(get_palette("voc", 21)[15]) == (192, 128, 128)
    with pytest.raises(ValueError, match="unknown palette"):
        get_palette("nope", 3)


@pytest.mark.parametrize("layout", ["cityscapes", "folder"])
def test_synthetic_generator(tmp_path, layout):
    generate(tmp_path, num_train=6, num_val=2, size=(48, 64), seed=3, layout=layout)
    kind = "cityscapes" if layout == "cityscapes" else "folder"
    ds = build_dataset(kind, tmp_path, "train")
    assert len(ds) == 6 and len(build_dataset(kind, tmp_path, "val")) == 2
    counts = torch.zeros(256, dtype=torch.long)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 48, 64)
        counts += torch.bincount(y.flatten(), minlength=256)
    assert counts[4:].sum() == 0  # only trainIds 0..3, never ignore
    assert (counts[:4] > 0).all(), counts[:4]
    if layout == "folder":
        assert (tmp_path / "classes.txt").read_text().split() == list(SYNTHETIC_CLASSES)
    # deterministic in the seed
    other = tmp_path / "again"
    generate(other, num_train=1, num_val=0, size=(48, 64), seed=3, layout=layout)
    assert torch.equal(build_dataset(kind, other, "train")[0][0], ds[0][0])


def test_synthetic_cli(tmp_path, capsys):
    synth_main([str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "32x40"])
    assert "wrote 2 train / 1 val" in capsys.readouterr().out
    assert CityscapesDataset(tmp_path, "val")[0][0].shape == (3, 32, 40)
    with pytest.raises(SystemExit):
        synth_main([str(tmp_path), "--size", "32by40"])
