"""SonoNet-16: the fetal standard-plane network, re-implemented for fetalscan.

Reference
---------
Baumgartner C.F., Kamnitsas K., Matthew J., Fletcher T.P., Smith S., Koch L.M.,
Kainz B., Rueckert D. "SonoNet: Real-Time Detection and Localisation of Fetal
Standard Scan Planes in Freehand Ultrasound". IEEE Trans. Med. Imaging 36(11),
2017 (arXiv:1612.05601).

Architecture (SN16 configuration)
---------------------------------
A VGG-like fully convolutional network on a single-channel 224 x 288 input:
five blocks of 3x3 convolutions (16-16 | 32-32 | 64-64-64 | 128-128-128 |
128-128-128), each convolution without bias followed by batch norm
(eps 1e-4) and ReLU, 2x2 max pooling after the first four blocks. An
"adaptation" stage of 1x1 convolutions (128 -> 64, BN, ReLU; 64 -> 14, BN)
maps features to the 13 standard planes plus background, and global average
pooling of those maps gives the class scores. The layer names below match the
published PyTorch conversion (``features.B.L.{0,1}``, ``adaption.{0,1,3,4}``)
so that the bundled weights load with strict key matching.

Preprocessing of the original (kept by :data:`SONONET_PREPROCESSING`):
grey scale, resize to 224 x 288 (H x W), then per-image standardisation
``255 * (x - mean) / std``. The factor 255 is how the network was trained.

In fetalscan the final 1x1 convolution and its batch norm are folded into one
``nn.Linear`` applied after pooling. Both are linear, so
``BN(conv1x1(avgpool(x))) == avgpool(BN(conv1x1(x)))`` in evaluation mode and the
14-class plane scores are exactly those of the original network, while a new
task simply gets a new linear head of the right size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: The bundled weights, byte-identical to the published SonoNet16.pth (Apache-2.0).
SONONET16_WEIGHTS = Path(__file__).with_name("weights") / "SonoNet16.pth"
SONONET16_SHA256 = "d744684e20d87dc8192bc46e37d44733d12f5263902eab615e5064cb866c8c21"

#: Output order of the original 14-class network.
SONONET_PLANES: tuple[str, ...] = (
    "3VV",
    "4CH",
    "Abdominal",
    "Background",
    "Brain (Cb.)",
    "Brain (Tv.)",
    "Femur",
    "Kidneys",
    "Lips",
    "LVOT",
    "Profile",
    "RVOT",
    "Spine (cor.)",
    "Spine (sag.)",
)

_SN16_BLOCKS: tuple[tuple[int, ...], ...] = (
    (16, 16),
    (32, 32),
    (64, 64, 64),
    (128, 128, 128),
    (128, 128, 128),
)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout, eps=1e-4),
        nn.ReLU(inplace=True),
    )


class SonoNet16(nn.Module):
    """SonoNet-16 with a timm-style interface.

    ``forward_features`` returns the adaptation feature map (B, 64, H/16, W/16),
    the layer Grad-CAM uses; ``forward_head(x, pre_logits=True)`` returns the
    pooled 64-d embedding; ``forward_head(x)`` the class logits.

    Parameters
    ----------
    num_classes : int
        Size of the linear head; 14 reproduces the original plane classifier.
        0 gives a feature extractor without a head.
    in_chans : int
        Input channels (1 in the original).
    drop_rate : float
        Dropout before the linear head.
    """

    num_features = 64

    def __init__(self, num_classes: int = 14, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = in_chans
        for i, widths in enumerate(_SN16_BLOCKS):
            layers: list[nn.Module] = []
            for w in widths:
                layers.append(_conv_bn_relu(cin, w))
                cin = w
            if i < len(_SN16_BLOCKS) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*blocks)
        self.adaption = nn.Sequential(
            nn.Conv2d(cin, self.num_features, kernel_size=1, bias=False),
            nn.BatchNorm2d(self.num_features),
            nn.ReLU(inplace=True),
        )
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.classifier: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a freshly initialised one with ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.classifier = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.adaption(self.features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        return self.classifier(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _fold_final_layer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn the original ``adaption.3`` (1x1 conv) + ``adaption.4`` (BN) into a Linear.

    ``y = gamma * (W x - mu) / sqrt(var + eps) + beta`` = ``W' x + b'``.
    """
    out = {k: v for k, v in state.items() if not k.startswith(("adaption.3", "adaption.4"))}
    w = state["adaption.3.weight"].flatten(1)  # (14, 64)
    gamma, beta = state["adaption.4.weight"], state["adaption.4.bias"]
    mu, var = state["adaption.4.running_mean"], state["adaption.4.running_var"]
    scale = gamma / torch.sqrt(var + 1e-5)  # nn.BatchNorm2d default eps in the original
    out["classifier.weight"] = w * scale[:, None]
    out["classifier.bias"] = beta - mu * scale
    return out


def load_sononet16_state(path: Path | str = SONONET16_WEIGHTS) -> dict[str, torch.Tensor]:
    """Read a published-layout SonoNet16 state dict and fold its last layer into a Linear.

    Returns a state dict for :class:`SonoNet16` with ``num_classes=14``.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return _fold_final_layer(state)


def sononet16(num_classes: int = 14, pretrained: bool = False, drop_rate: float = 0.0) -> SonoNet16:
    """Build SonoNet-16; with ``pretrained`` load the bundled in-domain weights.

    The backbone and adaptation layer always take the pretrained weights; the
    14-plane head is kept only when ``num_classes == 14``, otherwise a fresh
    head of ``num_classes`` outputs is initialised.
    """
    model = SonoNet16(num_classes=14, drop_rate=drop_rate)
    if pretrained:
        model.load_state_dict(load_sononet16_state(), strict=True)
    if num_classes != 14:
        model.reset_classifier(num_classes)
    return model
