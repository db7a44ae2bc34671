"""The judge: an image classifier with one head per concept kind, used to score generations.

For the shapes world the judge is a small CNN trained on rendered images (shipped beside the
model). It classifies object, colour, style and background, and its pooled features are the
space in which the Fréchet distance between generated and rendered images is measured.
Weights are safetensors plus a JSON config; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
    )


class Judge(nn.Module):
    """CNN over 32x32 RGB images in [-1, 1] with a linear head per concept kind.

    `classes` maps each kind ("object", "colour", ...) to its ordered class names.
    `forward` returns logits per kind; `features` the pooled feature vector (for FID).
    """

    def __init__(self, classes: dict[str, list[str]], width: int = 32):
        super().__init__()
        self.classes = {k: list(v) for k, v in classes.items()}
        self.width = width
        self.info: dict = {}  # metadata kept beside the weights (e.g. held-out accuracy)
        self.body = nn.Sequential(
            _block(3, width, 1),
            _block(width, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 2 * width, 1),
            _block(2 * width, 4 * width, 2),
            _block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, len(v)) for k, v in classes.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features, (N, 4*width), of images in [-1, 1]."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per kind for images (N, 3, H, W) in [-1, 1]."""
        feats = self.features(images)
        return {k: head(feats) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, list[str]]:
        """Predicted class name per kind for uint8 HxWx3 images (or tensors in [-1, 1])."""
        x = to_tensor(images) if isinstance(images, np.ndarray) else images
        out: dict[str, list[str]] = {k: [] for k in self.classes}
        for i in range(0, len(x), batch_size):
            logits = self(x[i : i + batch_size])
            for k, v in logits.items():
                out[k].extend(self.classes[k][j] for j in v.argmax(1).tolist())
        return out

    def save(self, folder: Path, extra: dict | None = None) -> None:
        """Write `judge.safetensors` and `judge.json` (classes, width, `extra` metadata)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "judge.safetensors")
        self.info.update(extra or {})
        config = {**self.info, "classes": self.classes, "width": self.width}
        (folder / "judge.json").write_text(json.dumps(config, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Judge":
        """Load a judge written by `save`; it comes back in eval mode."""
        folder = Path(folder)
        config = json.loads((folder / "judge.json").read_text())
        judge = cls(config["classes"], config["width"])
        judge.load_state_dict(load_file(folder / "judge.safetensors"))
        judge.info = {k: v for k, v in config.items() if k not in ("classes", "width")}
        return judge.eval()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) images to float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (N, 3, H, W) images in [-1, 1] to uint8 (N, H, W, 3)."""
    x = images.clamp(-1, 1).add(1).mul(127.5).round().byte()
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (replicate padding) of (N, C, H, W) images."""
    r = max(1, int(round(2 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = nn.functional.conv2d(nn.functional.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(nn.functional.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Corruptions that change how a concept is drawn but not which concept it is, so the
    judge reads generated images (soft, wobbly, low-contrast, tinted) the way a person would.

    Per image: a smooth random warp (a 4x4 displacement field of up to 1 px, upsampled) with
    a random scale in [0.9, 1.1] and a shift of up to 2 px (no rotation: square vs diamond is
    an orientation); a Gaussian blur (sigma 0.7) mixed in with weight up to 0.8; contrast in
    [0.7, 1.1]; a colour offset of up to +-0.08 per channel; pixel noise of std up to 0.06.
    Stronger blur or stroke erosion was tried and rejected: it turns dotted into solid and
    erases thin outlines, i.e. it changes the concept. Nothing here is fitted to any model.
    """
    n = len(x)
    F = nn.functional
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    size = x.shape[-1]
    theta = torch.zeros(n, 2, 3)
    scale = 0.9 + 0.2 * rand(n)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = (rand(n, 2) - 0.5) * 2 * (2 * 2 / size)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = (rand(n, 2, 4, 4) - 0.5) * 2 * (1.0 * 2 / size) * rand(n, 1, 1, 1)
    grid = grid + F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    alpha = 0.8 * rand(n, 1, 1, 1)
    x = (1 - alpha) * x + alpha * _gaussian_blur(x, 0.7)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = mean + (0.7 + 0.4 * rand(n, 1, 1, 1)) * (x - mean)
    x = x + (rand(n, 3, 1, 1) - 0.5) * 0.16
    x = x + torch.randn(x.shape, generator=generator) * rand(n, 1, 1, 1) * 0.06
    return x.clamp(-1, 1)
