"""obliviate: remove concepts from text-to-image diffusion models, one request after another.

Public API:
- `load_pipeline(model)`: a diffusers StableDiffusionPipeline from a shipped name
  (`"shapes"`), a local folder, a `.safetensors` file or a hub id (offline by default).
- `evaluate(pipe)`: the UnlearnCanvas-style metrics of a model (accuracy per concept, FID).
- `generate_images(pipe, prompts)`: seeded, batched sampling.
"""

import logging as _logging


class _NoTorchvisionNotice(_logging.Filter):
    """Drops transformers' "X requires torchvision (not installed); falling back" notices:
    obliviate never uses those image processors, and the notices pushed its own one-line
    errors down to the third line of every command's output."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

from .errors import ObliviateError  # noqa: E402
from .evaluate.evaluation import evaluate_model as evaluate  # noqa: E402
from .generate import generate_images, image_grid  # noqa: E402
from .pipeline import load_pipeline  # noqa: E402

__all__ = ["ObliviateError", "evaluate", "generate_images", "image_grid", "load_pipeline"]
__version__ = "0.1.0"
