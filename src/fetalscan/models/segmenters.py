"""Head segmenters: a U-Net (segmentation-models-pytorch) configured by :class:`SegmenterConfig`,
built by :func:`build_segmenter`, and saved / read as one checkpoint file of its own format.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015. The encoder, input size and decoder widths are part of the saved
architecture, so a checkpoint is rebuilt exactly."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from fetalscan.errors import CheckpointError, FetalscanError, ModelError

log = logging.getLogger(__name__)


SEGMENTER_FORMAT = "fetalscan-segmenter"


SEGMENTER_FORMAT_VERSION = 1


@dataclass
class SegmenterConfig:
    """Architecture of the head segmenter (saved in its checkpoint).

    A U-Net (Ronneberger et al. 2015) from ``segmentation_models_pytorch`` with a
    light encoder, one grey input channel and one output (head logit), run at a
    reduced input size (height, width multiples of 32). ``pretrained`` is
    ``none`` (default for smp encoders, offline), ``imagenet`` (downloaded by the
    library's own loader into its cache; needs network once) or, for the
    ``sononet16`` encoder, ``sononet`` (the bundled in-domain SonoNet-16 weights,
    offline; see :class:`SonoNetUNet`).
    """

    encoder: str = "mobilenet_v2"
    decoder_channels: str = "64,32,24,16,16"
    input_height: int = 128
    input_width: int = 192
    pretrained: str = "none"

    def channels(self) -> tuple[int, ...]:
        try:
            ch = tuple(int(c) for c in str(self.decoder_channels).split(","))
        except ValueError:
            raise FetalscanError(f"decoder_channels must be comma-separated integers, got {self.decoder_channels!r}") from None
        if len(ch) != 5 or min(ch) < 1:
            raise FetalscanError(f"decoder_channels needs 5 positive integers, got {self.decoder_channels!r}")
        return ch

    def validate(self) -> None:
        self.channels()
        for name in ("input_height", "input_width"):
            v = getattr(self, name)
            if v < 32 or v % 32:
                raise FetalscanError(f"--{name.replace('_', '-')} must be a positive multiple of 32, got {v}")
        allowed = ("none", "sononet") if self.encoder == SONONET_ENCODER else ("none", "imagenet")
        if self.pretrained not in allowed:
            raise FetalscanError(f"pretrained must be one of {', '.join(map(repr, allowed))} for the "
                                 f"{self.encoder} segmenter encoder, got {self.pretrained!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def preprocessing(self):
        """Grey input at ``(input_height, input_width)``, per-image standardisation (times 255 for the
        SonoNet-16 encoder, as SonoNet was trained)."""
        from fetalscan.data.transforms import Preprocessing

        scale = 255.0 if self.encoder == SONONET_ENCODER else 1.0
        return Preprocessing(input_size=(self.input_height, self.input_width), channels=1,
                             normalization="per_image", mean=(0.0,), std=(1.0,), scale=scale)


#: Encoder name of the in-domain U-Net (:class:`SonoNetUNet`).
SONONET_ENCODER = "sononet16"


def _conv_block(cin: int, cout: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _sononet_unet_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fetalscan.models.sononet import SonoNet16

    class SonoNetUNet(nn.Module):
        """U-Net (Ronneberger et al. 2015) whose encoder is SonoNet-16's convolutional trunk.

        SonoNet-16 (Baumgartner et al., IEEE TMI 2017) was trained on fetal ultrasound standard
        planes, so its filters are in-domain, and its weights ship with fetalscan (works offline,
        unlike ImageNet downloads). The trunk's five stages give the skips at 1, 1/2, 1/4 and 1/8 of
        the input and the bottleneck at 1/16 (128 channels). The decoder has four upsampling blocks
        (nearest x2, concatenate the skip, two 3x3 conv-BN-ReLU) of widths ``decoder[0..3]`` and a
        final 3x3 conv-BN-ReLU of width ``decoder[4]`` before the 1x1 head logit.
        """

        def __init__(self, decoder: tuple[int, ...], pretrained: bool) -> None:
            super().__init__()
            trunk = SonoNet16(num_classes=14)
            if pretrained:
                from fetalscan.models.sononet import load_sononet16_state

                trunk.load_state_dict(load_sononet16_state(), strict=True)
            self.encoder = trunk.features
            skips = (16, 32, 64, 128)
            cin = 128
            blocks = []
            for skip, width in zip(reversed(skips), decoder[:4]):
                blocks.append(_conv_block(cin + skip, width))
                cin = width
            self.decoder = nn.ModuleList(blocks)
            self.refine = nn.Sequential(nn.Conv2d(cin, decoder[4], 3, padding=1, bias=False),
                                        nn.BatchNorm2d(decoder[4]), nn.ReLU(inplace=True))
            self.head = nn.Conv2d(decoder[4], 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for stage in self.encoder:
                for layer in stage:
                    if isinstance(layer, nn.MaxPool2d):
                        skips.append(x)
                    x = layer(x)
            for block, skip in zip(self.decoder, reversed(skips)):
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
                x = block(torch.cat([x, skip], dim=1))
            return self.head(self.refine(x))

    return SonoNetUNet


def build_segmenter(cfg: SegmenterConfig):
    """A fresh ``smp.Unet`` for ``cfg`` (ImageNet encoder weights only with ``pretrained='imagenet'``)."""
    import segmentation_models_pytorch as smp

    cfg.validate()
    if cfg.encoder == SONONET_ENCODER:
        return _sononet_unet_class()(cfg.channels(), pretrained=cfg.pretrained == "sononet")
    weights = "imagenet" if cfg.pretrained == "imagenet" else None
    try:
        return smp.Unet(cfg.encoder, encoder_weights=weights, in_channels=1, classes=1,
                        decoder_channels=cfg.channels())
    except KeyError as exc:
        raise ModelError(f"unknown segmentation encoder {cfg.encoder!r} ({exc}); try mobilenet_v2, sononet16, "
                         "resnet18, resnet34 or efficientnet-b0") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if weights:
            raise ModelError(f"could not load ImageNet weights for encoder {cfg.encoder!r}: {exc}. "
                             "Offline? Use pretrained='none'.") from exc
        raise ModelError(f"cannot build the segmenter {cfg}: {exc}") from exc


def save_segmenter(path: str | Path, model, cfg: SegmenterConfig, *, calibration: dict,
                   training: dict | None = None, data: dict | None = None,
                   provenance: dict | None = None) -> Path:
    """Write a segmenter checkpoint atomically (plain dict, ``weights_only`` loadable)."""
    from fetalscan.models.checkpoint import cpu_state, save_blob

    return save_blob(
        path, SEGMENTER_FORMAT, format_version=SEGMENTER_FORMAT_VERSION,
        task="fetal head segmentation -> ellipse -> HC/BPD/OFD",
        architecture={"family": "smp.Unet", **cfg.to_dict()},
        preprocessing=cfg.preprocessing().to_dict(),
        calibration=dict(calibration),
        training=training or {},
        data=data or {},
        provenance=provenance or {},
        state_dict=cpu_state(model.state_dict()),
    )


def read_segmenter_checkpoint(path: str | Path) -> dict:
    """Read and validate a segmenter checkpoint dict (format, version, fields)."""
    from fetalscan.models.checkpoint import load_blob

    return load_blob(path, SEGMENTER_FORMAT, "head-segmenter checkpoint", format_version=SEGMENTER_FORMAT_VERSION,
                     required=("architecture", "calibration", "state_dict"))


def config_from_architecture(arch: dict, where: str = "checkpoint") -> SegmenterConfig:
    """Rebuild a :class:`SegmenterConfig` from a checkpoint's ``architecture`` block."""
    try:
        return SegmenterConfig(encoder=str(arch["encoder"]), decoder_channels=str(arch["decoder_channels"]),
                               input_height=int(arch["input_height"]), input_width=int(arch["input_width"]),
                               pretrained="none")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: architecture block is malformed ({exc!r}): {arch}") from None
