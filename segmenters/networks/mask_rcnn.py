"""Mask R-CNN (He et al., ICCV 2017), torchvision's, as a semantic segmenter of CT slices.

Mask R-CNN finds instances (a box, a class, a mask per object) rather than labelling every pixel, so
it trains on the connected components of each structure in a slice's label map and answers with its
detections painted into per-class probability maps: log-probabilities, which the rest of the
package treats like any network's logits (their argmax is the label map). The backbone is a small
four-stage network with torchvision's feature pyramid, scaled by ``width`` like the other networks
(the usual ResNet-50 would dwarf them); images are used at their own size, not resized to 800 pixels.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from segmenters.networks.layers import conv_bn_relu

_MIN_INSTANCE_PIXELS = 4  # smaller components are noise to a detector (and have no box to regress)
_LEVELS = ("0", "1", "2", "3", "pool")  # pyramid levels at strides 4, 8, 16, 32 and 64


class _Backbone(nn.Module):
    """Four strided stages (strides 4, 8, 16, 32) under a feature pyramid of ``out_channels``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        channels = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(conv_bn_relu(in_channels, width, stride=2), conv_bn_relu(width, width))
        self.stages = nn.ModuleList()
        previous = width
        for c in channels:
            self.stages.append(nn.Sequential(conv_bn_relu(previous, c, stride=2), conv_bn_relu(c, c)))
            previous = c
        self.out_channels = 4 * width
        self.fpn = FeaturePyramidNetwork(channels, self.out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage in zip(_LEVELS, self.stages, strict=False):
            x = stage(x)
            features[name] = x
        return self.fpn(features)


class _SameSizeTransform(GeneralizedRCNNTransform):
    """torchvision's input transform without its resize: slices are already at the model's spacing."""

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


class MaskRCNNSegmenter(nn.Module):
    """Slices ``(N, C, H, W)`` in, class log-probabilities ``(N, num_classes, H, W)`` out (eval mode).

    Training goes through :meth:`training_loss`, Mask R-CNN's own losses on the instances of the
    label maps, since a detector has no per-pixel logits to score.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        del dropout  # Mask R-CNN has no dropout layer; accepted so every architecture builds alike
        backbone = _Backbone(in_channels, width)
        features = backbone.out_channels
        pool = MultiScaleRoIAlign(featmap_names=list(_LEVELS[:4]), output_size=7, sampling_ratio=2)
        mask_pool = MultiScaleRoIAlign(featmap_names=list(_LEVELS[:4]), output_size=14, sampling_ratio=2)
        representation = 16 * width
        self.detector = MaskRCNN(
            backbone,
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(
                sizes=((8,), (16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * len(_LEVELS)
            ),
            box_roi_pool=pool,
            box_head=TwoMLPHead(features * 7 * 7, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes),
            mask_roi_pool=mask_pool,
            mask_head=MaskRCNNHeads(features, [features] * 4, 1),
            mask_predictor=MaskRCNNPredictor(features, features, num_classes),
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300,
            rpn_post_nms_top_n_test=150,
            box_batch_size_per_image=128,
            box_detections_per_img=50,
        )
        # Windowed CT is already in [0, 1]: no normalisation, no resize (the padding to 32 stays).
        self.detector.transform = _SameSizeTransform(
            min_size=1, max_size=1, image_mean=[0.0] * in_channels, image_std=[1.0] * in_channels
        )
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("Mask R-CNN trains through training_loss(x, y); forward is for eval mode")
        detections = self.detector(list(x))
        return torch.stack([self._class_log_probs(d, x.shape[-2:]) for d in detections])

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The sum of Mask R-CNN's losses (proposals, boxes, classes, masks) for slices and label maps."""
        targets = [_instances(labels, self.num_classes, x.device) for labels in y]
        losses = self.detector(list(x), targets)
        return sum(losses.values(), torch.zeros((), device=x.device))

    def _class_log_probs(self, detection: dict[str, torch.Tensor], size: torch.Size) -> torch.Tensor:
        """Each class's probability is its best detection's score times its mask; background is what
        the best class leaves."""
        probs = torch.zeros((self.num_classes, *size), device=detection["masks"].device)
        for label, score, mask in zip(
            detection["labels"], detection["scores"], detection["masks"], strict=True
        ):
            probs[label] = torch.maximum(probs[label], score * mask[0])
        probs[0] = 1.0 - probs[1:].amax(dim=0)
        probs = probs.clamp_min(1e-6)
        return (probs / probs.sum(dim=0, keepdim=True)).log()


def _instances(labels: torch.Tensor, num_classes: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One instance per connected component of each foreground class (labels outside 1 ..
    num_classes - 1, such as the loss's ignore value, are background here)."""
    y = labels.cpu().numpy()
    boxes, classes, masks = [], [], []
    for c in range(1, num_classes):
        components, _ = ndimage.label(y == c)
        for k, found in enumerate(ndimage.find_objects(components), start=1):
            if found is None:
                continue
            mask = components == k
            if mask.sum() < _MIN_INSTANCE_PIXELS:
                continue
            rows, cols = found
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            classes.append(c)
            masks.append(mask)
    h, w = y.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4),
        "labels": torch.tensor(classes, dtype=torch.int64, device=device),
        "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), bool)).to(device),
    }
