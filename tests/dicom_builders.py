"""Small uncompressed ultrasound DICOM files for the tests (one builder for every test file).

:func:`write_dicom` writes frames of any photometric interpretation the readers handle,
single- or multi-frame; extra keyword arguments set DICOM elements by keyword (patient,
study, calibration ...), after the defaults of :func:`base_dataset`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)


def write_dicom(
    path: Path,
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    *,
    planar: int = 0,
    multiframe: bool | None = None,
    **elements,
) -> Path:
    """Write ``frames`` (H,W), (H,W,3), (N,H,W) or (N,H,W,3) as an uncompressed DICOM."""
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
    single = frames.ndim == (3 if colour else 2)
    stack = frames[None] if single else frames
    ds = base_dataset(path, stack.shape[1], stack.shape[2], photometric, stack.dtype.itemsize * 8)
    if multiframe if multiframe is not None else not single:
        ds.NumberOfFrames = len(stack)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    if colour:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = planar
    ds.PixelData = b"".join(_encode_frame(f, photometric, planar) for f in stack)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def base_dataset(path: Path, rows: int, cols: int, photometric: str, bits: int,
                 transfer_syntax=ExplicitVRLittleEndian) -> FileDataset:
    """An ultrasound image dataset without pixel data: study 1.2.826.0.1.3680043.8.498.1, patient PAT-001."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PAT-001"
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


def _encode_frame(frame: np.ndarray, photometric: str, planar: int) -> bytes:
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        frame = convert_color_space(frame.copy(), "RGB", "YBR_FULL")
    if photometric == "YBR_FULL_422":  # per pixel pair: Y0 Y1 Cb Cr (PS3.3 C.7.6.3.1.2)
        y, cb, cr = frame[..., 0], frame[..., 1], frame[..., 2]
        packed = np.stack(
            [y[:, 0::2], y[:, 1::2], cb[:, 0::2], cr[:, 0::2]], axis=-1
        )
        return packed.astype("<u1").tobytes()
    if frame.ndim == 3 and planar == 1:
        frame = np.moveaxis(frame, -1, 0)
    return frame.astype(frame.dtype.newbyteorder("<")).tobytes()
