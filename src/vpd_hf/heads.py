"""Task heads on VPD's UNet features. Plain `nn.Module`s that take the list of four feature maps (high resolution first,
image strides 8, 16, 32, 64); they know nothing about the UNet or the text.

Each layer whose initialisation VPD prescribes carries an `vpd_init` tag, read by `VPDPreTrainedModel._init_weights`:
the model initialises exactly the layers VPD owns and never touches the diffusion weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (kind, std): "trunc_normal" / "normal" draw the weight and zero the bias, "norm" resets a normalisation layer,
# "torch_default" re-applies PyTorch's default `nn.Linear` initialisation, "xavier_uniform" and "kaiming_fan_out"
# (He normal, fan-out, for ReLU) are mmcv's defaults for FPN necks and ConvModules.
InitSpec = tuple[str, float | None]


def tag_init(module: nn.Module, kind: str, std: float | None = None) -> nn.Module:
    module.vpd_init = (kind, std)
    return module


def _tag_tree(module: nn.Module, conv_spec: InitSpec) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            tag_init(layer, *conv_spec)
        elif isinstance(layer, (nn.GroupNorm, nn.BatchNorm2d)):
            tag_init(layer, "norm")


class VPDDepthNeck(nn.Module):
    r"""
    Fuses the four UNet maps at 1/32 of the image (the reference's `VPDDepthEncoder` convolutions): the 1/8 map goes
    through two stride-2 convs, the 1/16 map through one, the 1/64 map is upsampled x2 (nearest), all are concatenated
    with the 1/32 map and projected by a 1x1 conv + GroupNorm(16) + ReLU.

    Input: four maps `(B, C_i, H_i, W_i)`; output `(B, out_channels, H / 32, W / 32)` (padded size).
    """

    def __init__(self, in_channels: list[int], out_channels: int, groups: int = 16, init_std: float = 0.02) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"VPDDepthNeck needs 4 input channel counts, got {in_channels}.")
        c0, c1 = in_channels[0], in_channels[1]
        if c0 % groups or out_channels % groups:
            raise ValueError(
                f"VPDDepthNeck's GroupNorm({groups}) needs channel counts divisible by {groups}; got "
                f"{c0} (1/8 feature map) and {out_channels} (neck channels)."
            )
        self.layer1 = nn.Sequential(
            nn.Conv2d(c0, c0, 3, stride=2, padding=1),
            nn.GroupNorm(groups, c0),
            nn.ReLU(),
            nn.Conv2d(c0, c0, 3, stride=2, padding=1),
        )
        self.layer2 = nn.Sequential(nn.Conv2d(c1, c1, 3, stride=2, padding=1))
        self.out_layer = nn.Sequential(
            nn.Conv2d(sum(in_channels), out_channels, 1), nn.GroupNorm(groups, out_channels), nn.ReLU()
        )
        _tag_tree(self, ("trunc_normal", init_std))

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        f8, f16, f32, f64 = features
        fused = torch.cat(
            [self.layer1(f8), self.layer2(f16), f32, F.interpolate(f64, scale_factor=2.0, mode="nearest")], dim=1
        )
        return self.out_layer(fused)


class VPDDepthDecoder(nn.Module):
    r"""
    Transposed-conv decoder of the reference (Simple Baseline / GLPDepth lineage): `len(filters)` x [ConvTranspose2d
    stride 2 (no bias) + BatchNorm + ReLU], then conv3x3 + BatchNorm + ReLU to `out_channels`, then bilinear x2
    upsamplings back to the image resolution (two for the default three deconvolutions).

    Input `(B, in_channels, h, w)` at 1/32 of the image; output `(B, out_channels, 32 h, 32 w)`.
    """

    _DECONV_PADDING = {2: (0, 0), 3: (1, 1), 4: (1, 0)}  # kernel -> (padding, output_padding), each exactly x2

    def __init__(
        self, in_channels: int, filters: list[int], kernels: list[int], out_channels: int, init_std: float = 0.001
    ) -> None:
        super().__init__()
        if len(filters) != len(kernels) or not 1 <= len(filters) <= 5:
            raise ValueError(
                f"Need 1 to 5 deconvolutions with one kernel each, got filters={filters}, kernels={kernels}."
            )
        layers: list[nn.Module] = []
        planes = in_channels
        for out_planes, kernel in zip(filters, kernels, strict=True):
            if kernel not in self._DECONV_PADDING:
                raise ValueError(f"Deconvolution kernels must be in {sorted(self._DECONV_PADDING)}, got {kernel}.")
            padding, output_padding = self._DECONV_PADDING[kernel]
            layers += [
                nn.ConvTranspose2d(
                    planes, out_planes, kernel, stride=2, padding=padding, output_padding=output_padding, bias=False
                ),
                nn.BatchNorm2d(out_planes),
                nn.ReLU(inplace=True),
            ]
            planes = out_planes
        self.deconv_layers = nn.Sequential(*layers)
        self.conv_layers = nn.Sequential(
            nn.Conv2d(planes, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)
        )
        self.num_upsamplings = 5 - len(filters)
        _tag_tree(self, ("normal", init_std))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv_layers(self.deconv_layers(hidden_states))
        for _ in range(self.num_upsamplings):
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="bilinear", align_corners=False)
        return hidden_states


class VPDConvDeconvHead(nn.Module):
    r"""
    The official VPD depth head's body, for any number of output channels: :class:`VPDDepthNeck` -> crop to the
    un-padded 1/32 grid -> :class:`VPDDepthDecoder` -> conv3x3 + ReLU + conv3x3 to `out_channels` (the module named
    `last_layer_name`). Subclasses map the raw output to their quantity (:meth:`activation`).

    The crop reproduces the reference exactly: a 480x480 crop is padded to 512x512, the 16x16 neck output is cropped to
    15x15 (after the GroupNorm, which therefore sees the padded map) and decoded to 480x480.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        last_layer_name: str,
        last_layer_init: InitSpec,
        neck_channels: int = 1536,
        head_channels: int = 192,
        deconv_filters: list[int] = (32, 32, 32),
        deconv_kernels: list[int] = (2, 2, 2),
        neck_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.neck = VPDDepthNeck(in_channels, neck_channels, init_std=neck_init_std)
        self.decoder = VPDDepthDecoder(neck_channels, list(deconv_filters), list(deconv_kernels), head_channels)
        self._last_layer_name = last_layer_name
        last_layer = nn.Sequential(
            nn.Conv2d(head_channels, head_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_channels, out_channels, 3, padding=1),
        )
        _tag_tree(last_layer, last_layer_init)
        self.add_module(last_layer_name, last_layer)

    def activation(self, outputs: torch.Tensor) -> torch.Tensor:
        """Maps the raw `(B, out_channels, H, W)` output to the head's quantity."""
        raise NotImplementedError

    def forward(
        self, features: list[torch.Tensor] | tuple[torch.Tensor, ...], output_size: tuple[int, int]
    ) -> torch.Tensor:
        """Returns `activation(outputs)` `(B, out_channels, H, W)` for an image of `output_size = (H, W)` (before
        padding)."""
        height, width = output_size
        hidden_states = self.neck(features)
        hidden_states = hidden_states[:, :, : math.ceil(height / 32), : math.ceil(width / 32)]
        outputs = getattr(self, self._last_layer_name)(self.decoder(hidden_states))
        return self.activation(outputs[:, :, :height, :width])


class VPDDepthHead(VPDConvDeconvHead):
    r"""
    The official VPD depth head: :class:`VPDConvDeconvHead` with one output channel and `sigmoid * max_depth`; returns
    depth `(B, H, W)` in metres.
    """

    def __init__(
        self,
        in_channels: list[int],
        neck_channels: int = 1536,
        head_channels: int = 192,
        deconv_filters: list[int] = (32, 32, 32),
        deconv_kernels: list[int] = (2, 2, 2),
        max_depth: float = 10.0,
        neck_init_std: float = 0.02,
    ) -> None:
        super().__init__(
            in_channels,
            1,
            "last_layer_depth",
            ("normal", 0.001),
            neck_channels,
            head_channels,
            deconv_filters,
            deconv_kernels,
            neck_init_std,
        )
        self.max_depth = float(max_depth)

    def activation(self, outputs: torch.Tensor) -> torch.Tensor:
        # channel selected before the product: the result owns its memory (not a view), which FSDP2 wants of a root
        # module's outputs; the values are the same element-wise ops
        return torch.sigmoid(outputs[:, 0]) * self.max_depth


class VPDNormalsHead(VPDConvDeconvHead):
    r"""
    Surface-normal head: the depth head's architecture (:class:`VPDConvDeconvHead`, same neck, decoder and sizes) with
    three output channels, L2-normalised per pixel; returns unit normals `(B, 3, H, W)` (camera frame, see
    `VPDModelForNormalEstimation`). Its last convolutions keep PyTorch's default initialisation: the depth head's
    std-0.001 init would start the normalisation on near-zero vectors, where its gradient is largest.
    """

    def __init__(
        self,
        in_channels: list[int],
        neck_channels: int = 1536,
        head_channels: int = 192,
        deconv_filters: list[int] = (32, 32, 32),
        deconv_kernels: list[int] = (2, 2, 2),
        neck_init_std: float = 0.02,
    ) -> None:
        super().__init__(
            in_channels,
            3,
            "last_layer_normals",
            ("torch_default", None),
            neck_channels,
            head_channels,
            deconv_filters,
            deconv_kernels,
            neck_init_std,
        )

    def activation(self, outputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(outputs.float(), dim=1, eps=1e-6).to(outputs.dtype)


class VPDReferringDecoder(nn.Module):
    r"""
    The referring decoder of VPD (LAVT's `SimpleDecoding` on VPD's features): starting from the 1/64 map, three
    fuse-and-upsample stages — bilinear upsampling (align_corners=True) to the next finer map, concatenation, and
    2 x [conv3x3 (no bias) + BatchNorm + ReLU] — then a 1x1 conv to 2 classes (background, foreground).

    Input: four maps `(B, C_i, H_i, W_i)`, finest first (VPD: `[320, 640 + T, 1280 + T, 1280]`); output: logits
    `(B, 2, H_0, W_0)` at 1/8 of the image. Parameter names follow the reference (`conv1_4`, `bn1_4`, ...).
    """

    def __init__(self, in_channels: list[int], hidden_channels: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = in_channels
        for stage, skip in (("4", c3), ("3", c2), ("2", c1)):
            inputs = (c4 if stage == "4" else hidden_channels) + skip
            self.add_module(f"conv1_{stage}", nn.Conv2d(inputs, hidden_channels, 3, padding=1, bias=False))
            self.add_module(f"bn1_{stage}", nn.BatchNorm2d(hidden_channels))
            self.add_module(f"conv2_{stage}", nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, bias=False))
            self.add_module(f"bn2_{stage}", nn.BatchNorm2d(hidden_channels))
        self.conv1_1 = nn.Conv2d(hidden_channels, 2, 1)
        _tag_tree(self, ("torch_default", None))  # the reference leaves PyTorch's initialisation

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        x_c1, x_c2, x_c3, x_c4 = features
        hidden = x_c4
        for stage, skip in (("4", x_c3), ("3", x_c2), ("2", x_c1)):
            if hidden.shape[-2] < skip.shape[-2] or hidden.shape[-1] < skip.shape[-1]:
                hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            hidden = torch.cat([hidden, skip], dim=1)
            for index in ("1", "2"):
                conv, norm = getattr(self, f"conv{index}_{stage}"), getattr(self, f"bn{index}_{stage}")
                hidden = F.relu(norm(conv(hidden)))
        return self.conv1_1(hidden)


class ConvBNReLU(nn.Module):
    """conv3x3 (no bias) + BatchNorm + ReLU, named `conv` / `bn` like mmcv's ConvModule (eases checkpoint conversion)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = tag_init(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), "kaiming_fan_out")
        self.bn = tag_init(nn.BatchNorm2d(out_channels), "norm")
        self.act = nn.ReLU(inplace=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(hidden_states)))


class VPDFPNNeck(nn.Module):
    r"""
    Feature pyramid (mmsegmentation's `FPN` with `num_outs = 4`, no norm/activation): 1x1 lateral convs to
    `out_channels`, top-down nearest-upsampling sums, then a 3x3 conv per level.

    Input: four maps `(B, C_i, H_i, W_i)` (VPD: UNet channels plus attention-map channels); output: four
    `(B, out_channels, H_i, W_i)` maps.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        _tag_tree(self, ("xavier_uniform", None))

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + F.interpolate(
                laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest"
            )
        return [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals, strict=True)]


class VPDSemanticFPNHead(nn.Module):
    r"""
    Semantic FPN decoder (Kirillov et al.; mmsegmentation's `FPNHead`): level `i` goes through `max(1, i)` x
    [ConvBNReLU + bilinear x2 upsampling (none on level 0)] to the finest level, the four are summed, then Dropout2d and
    a 1x1 classifier.

    Input: four `(B, in_channels, H_i, W_i)` maps, finest first; output: logits `(B, num_labels, H_0, W_0)` (1/8 of the
    image for VPD).
    """

    def __init__(
        self, num_labels: int, in_channels: int = 256, channels: int = 256, num_levels: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(num_levels):
            layers: list[nn.Module] = []
            for k in range(max(1, level)):
                layers.append(ConvBNReLU(in_channels if k == 0 else channels, channels))
                if level > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = tag_init(nn.Conv2d(channels, num_labels, 1), "normal", 0.01)

    def forward(self, features: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        output = self.scale_heads[0](features[0])
        for head, feature in zip(self.scale_heads[1:], features[1:], strict=True):
            output = output + F.interpolate(head(feature), size=output.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(output))


__all__ = [
    "ConvBNReLU",
    "VPDConvDeconvHead",
    "VPDDepthDecoder",
    "VPDDepthHead",
    "VPDDepthNeck",
    "VPDFPNNeck",
    "VPDNormalsHead",
    "VPDReferringDecoder",
    "VPDSemanticFPNHead",
    "tag_init",
]
