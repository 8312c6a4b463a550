"""Loading data: manifests, folder trees, DICOM / video through manifests, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import blob_image, write_manifest, write_png
from PIL import Image

from fetalscan.data.records import (
    load_dataset,
    prepare_images,
    read_image,
    read_record_image,
)
from fetalscan.errors import DataError, ImageReadError, SplitError
from fetalscan.models.registry import get_backbone_spec
from fetalscan.splits import apply_rare_class_policy

# --------------------------------------------------------------------------- real data


def test_shared_manifest_loads_with_groups_and_sorted_classes(fetal_brain: Path) -> None:
    ds = load_dataset(fetal_brain)
    assert len(ds) == 166
    assert len(set(ds.groups)) == 64
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 16
    assert all(r.path.is_file() and r.path.is_absolute() for r in ds.records)
    # extra manifest columns are carried along
    assert "source_name" in ds.records[0].extra


def test_real_jpeg_reads_as_rgb_uint8(fetal_brain: Path) -> None:
    rec = load_dataset(fetal_brain).records[0]
    img = read_record_image(rec)
    assert img.dtype == np.uint8 and img.shape == (640, 640, 3)


def test_explicit_class_order_is_kept(example_manifest: Path) -> None:
    ds = load_dataset(example_manifest)
    order = list(reversed(ds.classes))
    assert load_dataset(example_manifest, classes=order).classes == order


def test_unknown_label_for_given_classes_is_an_error(example_manifest: Path) -> None:
    with pytest.raises(DataError, match="not in the given classes"):
        load_dataset(example_manifest, classes=["normal"])


def test_data_hash_changes_with_a_label(tmp_path: Path, toy_manifest) -> None:
    m = toy_manifest(groups=2, per_group=1)
    h1 = load_dataset(m).data_hash()
    text = m.read_text().replace(",abnormal,abnormal_0", ",normal,abnormal_0", 1)
    assert text != m.read_text()
    m.write_text(text)
    assert load_dataset(m).data_hash() != h1


# --------------------------------------------------------------------------- image modes


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_every_image_mode_becomes_rgb_uint8(tmp_path: Path, mode: str) -> None:
    base = blob_image(1)[..., 0]
    if mode == "I;16":
        im = Image.fromarray(base.astype(np.uint16) * 256)
    else:
        im = Image.fromarray(base).convert(mode)
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    im.save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    # grey pictures are replicated to three identical channels
    if mode in ("L", "I;16"):
        assert np.array_equal(out[..., 0], out[..., 2])


def test_grey_and_rgb_copies_prepare_identically(tmp_path: Path) -> None:
    grey = blob_image(3)[..., 0]
    write_png(tmp_path / "g.png", grey)
    write_png(tmp_path / "c.png", np.repeat(grey[..., None], 3, axis=2))
    for name in ("sononet16", "resnet34"):
        pre = get_backbone_spec(name).preprocessing
        from fetalscan.data.transforms import prepare

        a = prepare(read_image(tmp_path / "g.png"), pre)
        b = prepare(read_image(tmp_path / "c.png"), pre)
        assert a.shape == (pre.channels, *pre.input_size)
        assert np.array_equal(a.numpy(), b.numpy())


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    Image.fromarray(blob_image(2, size=128)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(path)


def test_garbage_file_with_image_extension_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match="noise.png"):
        read_image(path)


# --------------------------------------------------------------------------- manifests


def test_missing_columns_are_named(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", blob_image(0))
    m = write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "x"}])
    with pytest.raises(DataError, match=r"missing required column\(s\) group"):
        load_dataset(m)


def test_missing_file_names_row_and_path(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", blob_image(0))
    m = write_manifest(tmp_path / "m.csv", [
        {"path": "a.png", "label": "x", "group": "g1"},
        {"path": "nope.png", "label": "x", "group": "g2"},
    ])
    with pytest.raises(DataError, match=r"line 3, field 'path'.*nope.png"):
        load_dataset(m)


def test_group_with_two_labels_is_refused(tmp_path: Path) -> None:
    for n in ("a", "b"):
        write_png(tmp_path / f"{n}.png", blob_image(ord(n)))
    m = write_manifest(tmp_path / "m.csv", [
        {"path": "a.png", "label": "normal", "group": "p1"},
        {"path": "b.png", "label": "encephalocele", "group": "p1"},
    ])
    with pytest.raises(DataError, match="group 'p1' carries two labels"):
        load_dataset(m)


def test_non_numeric_ga_weeks_names_the_field(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", blob_image(0))
    m = write_manifest(tmp_path / "m.csv", [{"path": "a.png", "label": "x", "group": "g", "ga_weeks": "twenty"}])
    with pytest.raises(DataError, match="field 'ga_weeks'"):
        load_dataset(m)


def test_optional_metadata_is_read(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", blob_image(0))
    m = write_manifest(tmp_path / "m.csv", [
        {"path": "a.png", "label": "x", "group": "g", "ga_weeks": "21.5", "center": "A", "device": "V10", "view": "TV"},
    ])
    r = load_dataset(m).records[0]
    assert (r.ga_weeks, r.center, r.device, r.view) == (21.5, "A", "V10", "TV")


def test_prediction_manifest_may_omit_labels(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", blob_image(0))
    m = write_manifest(tmp_path / "m.csv", [{"path": "a.png"}])
    ds = load_dataset(m, require_labels=False)
    assert ds.records[0].label is None and ds.records[0].group == "a"


# --------------------------------------------------------------------------- folders


def test_folder_tree_groups_by_stem_or_regex(tmp_path: Path) -> None:
    for c in ("normal", "vm"):
        for pid in (1, 2):
            for k in (1, 2):
                write_png(tmp_path / c / f"pat{pid}{c}_img{k}.png", blob_image(pid * 10 + k))
    ds = load_dataset(tmp_path)
    assert ds.classes == ["normal", "vm"] and len(ds) == 8
    assert len(set(ds.groups)) == 8  # default: one group per file stem
    ds = load_dataset(tmp_path, group_regex=r"(pat\d+\w+?)_img")
    assert sorted(set(ds.groups)) == ["pat1normal", "pat1vm", "pat2normal", "pat2vm"]


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    write_png(tmp_path / "normal" / "a.png", blob_image(0))
    (tmp_path / "vm").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        load_dataset(tmp_path)


def test_empty_folder_for_prediction(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty folder"):
        load_dataset(tmp_path, require_labels=False)


def test_regex_that_does_not_match_names_the_file(tmp_path: Path) -> None:
    write_png(tmp_path / "normal" / "a.png", blob_image(0))
    with pytest.raises(DataError, match="does not match normal/a.png"):
        load_dataset(tmp_path, group_regex=r"patient(\d+)")


# --------------------------------------------------------------------------- DICOM / video via manifests


def _cine_dicom(path: Path, frames: np.ndarray, study_uid: str = "1.2.3.4") -> Path:
    from dicom_builders import write_dicom

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dicom(path, frames.astype(np.uint8), multiframe=True, StudyInstanceUID=study_uid, PatientID="anon")


def test_cine_dicom_expands_into_frames_of_one_group(tmp_path: Path) -> None:
    frames = np.stack([np.full((32, 48), 10 * i, np.uint8) for i in range(6)])
    _cine_dicom(tmp_path / "clip.dcm", frames)
    m = write_manifest(tmp_path / "m.csv", [{"path": "clip.dcm", "label": "normal", "group": "patient7"}])
    ds = load_dataset(m, every_nth=2)
    assert [r.frame for r in ds.records] == [0, 2, 4]
    assert {r.group for r in ds.records} == {"patient7"}
    pre = get_backbone_spec("sononet16").preprocessing
    images, _ = prepare_images(ds.records, pre)
    assert [int(images[i].float().mean()) for i in range(3)] == [0, 20, 40]


def test_dicom_in_folder_tree_is_grouped_by_study(tmp_path: Path) -> None:
    frames = np.stack([np.full((16, 16), 50, np.uint8)] * 2)
    _cine_dicom(tmp_path / "normal" / "a.dcm", frames, "1.2.826.1")
    _cine_dicom(tmp_path / "normal" / "b.dcm", frames, "1.2.826.1")
    _cine_dicom(tmp_path / "vm" / "c.dcm", frames, "1.2.826.2")
    ds = load_dataset(tmp_path)
    assert len(ds) == 6
    from fetalscan.data.dicom import study_pseudonym

    groups = {r.group for r in ds.records if r.label == "normal"}
    assert groups == {study_pseudonym("1.2.826.1")} and next(iter(groups)).startswith("study-")
    assert study_pseudonym("1.2.826.1") != study_pseudonym("1.2.826.2")  # the UID itself is never written


def test_truncated_dicom_in_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    frames = np.stack([np.full((64, 64), 9, np.uint8)] * 4)
    path = _cine_dicom(tmp_path / "bad.dcm", frames)
    path.write_bytes(path.read_bytes()[:-5000])
    m = write_manifest(tmp_path / "m.csv", [{"path": "bad.dcm", "label": "x", "group": "g"}])
    with pytest.raises(ImageReadError, match="bad.dcm"):
        ds = load_dataset(m)
        prepare_images(ds.records, get_backbone_spec("sononet16").preprocessing)


def test_video_in_manifest_expands_into_frames(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for i in range(5):
        writer.write(np.full((32, 32, 3), 40 * i, np.uint8))
    writer.release()
    m = write_manifest(tmp_path / "m.csv", [{"path": "clip.avi", "label": "normal", "group": "p"}])
    ds = load_dataset(m)
    assert [r.frame for r in ds.records] == [0, 1, 2, 3, 4]
    assert read_record_image(ds.records[3]).mean() == pytest.approx(120, abs=6)


# --------------------------------------------------------------------------- rare classes


def test_rare_class_policies(example_manifest: Path) -> None:
    ds = load_dataset(example_manifest)
    with pytest.raises(SplitError, match="holoprosencephaly \\(1 group\\)"):
        apply_rare_class_policy(ds, 5, "error")
    merged = apply_rare_class_policy(ds, 5, "merge")
    assert merged.classes == ["mild_ventriculomegaly", "moderate_ventriculomegaly", "normal", "other"]
    assert any(r.label_original == "vein_of_galen" and r.label == "other" for r in merged.records)
    dropped = apply_rare_class_policy(ds, 5, "drop")
    assert set(dropped.labels) == {"mild_ventriculomegaly", "moderate_ventriculomegaly", "normal"}


def test_merge_that_still_lacks_groups_is_an_error(toy_manifest) -> None:
    m = toy_manifest(groups=2, per_group=1)
    with pytest.raises(SplitError, match="fewer groups"):
        apply_rare_class_policy(load_dataset(m), 5, "merge")


def test_a_long_cine_is_read_with_bounded_memory(tmp_path: Path) -> None:
    """A 600-frame cine (9.8 MB of pixels, 29 MB decoded to RGB) is read a few frames at a time:
    the peak of Python/numpy allocations while every frame is yielded stays far below either size."""
    import tracemalloc

    from fetalscan.data.records import FRAMES_PER_READ, iter_record_images, load_dataset

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(600, 128, 128), dtype=np.uint8)
    _cine_dicom(tmp_path / "normal" / "long.dcm", frames)
    records = load_dataset(tmp_path).records
    assert len(records) == 600
    frame_rgb = 128 * 128 * 3
    tracemalloc.start()
    try:
        seen = 0
        for i, image in iter_record_images(records):
            assert image.shape == (128, 128, 3) and image[0, 0, 0] == frames[records[i].frame][0, 0]
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 600
    assert FRAMES_PER_READ * frame_rgb < 2 * 2**20  # the chunk itself is small
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading the cine"
