"""A small CNN for 28x28 digits, used as the reference network of the built-in MNIST evaluator.

``ReferenceCNN``: [conv3x3-BN-ReLU] x2, maxpool, [conv3x3-BN-ReLU] x2, maxpool, flatten, dropout,
fc(128)-ReLU (the *features* used for FID), dropout, fc(num_classes) (the logits used for the
inception score and the class histogram). Inputs are images (B, C, 28, 28) in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ReferenceCNN(nn.Module):
    """conv-conv-pool-conv-conv-pool-fc(feature_dim)-fc(num_classes) with BatchNorm and dropout.

    width: channels of the first two convolutions (the last two have ``2 * width``). The default 16
    costs ~5 MMAC per 28x28 image (width 32: ~19), which keeps the one-off training on a 2-core CPU
    to a few minutes while reaching > 99% MNIST test accuracy. Call ``eval()`` before measuring:
    BatchNorm then uses its running statistics, so an image's features do not depend on its batch.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        feature_dim: int = 128,
        image_size: int = 28,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            width=width,
            feature_dim=feature_dim,
            image_size=image_size,
            dropout=dropout,
        )
        self.body = nn.Sequential(
            _conv_block(in_channels, width),
            _conv_block(width, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        flat = 2 * width * (image_size // 4) ** 2
        self.fc_features = nn.Linear(flat, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc_logits = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> penultimate activations (B, feature_dim) (after ReLU)."""
        return torch.relu(self.fc_features(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> logits (B, num_classes)."""
        return self.fc_logits(self.dropout(self.features(x)))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs from one pass (eval mode: dropout is the identity): x (B, C, H, W) in [-1, 1] -> features
        (B, feature_dim), logits (B, num_classes)."""
        features = self.features(x)
        return features, self.fc_logits(self.dropout(features))
