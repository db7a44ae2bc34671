"""obliviate: remove concepts from text-to-image diffusion models, one request after another.

Public API:
- `load_pipeline(model)`: a diffusers StableDiffusionPipeline from a shipped name
  (`"shapes"`), a local folder, a `.safetensors` file or a hub id (offline by default).
- `evaluate(pipe)`: the UnlearnCanvas-style metrics of a model (accuracy per concept, FID).
- `generate_images(pipe, prompts)`: seeded, batched sampling.
"""

from .errors import ObliviateError
from .evaluate.evaluation import evaluate_model as evaluate
from .generate import generate_images, image_grid
from .pipeline import load_pipeline

__all__ = ["ObliviateError", "evaluate", "generate_images", "image_grid", "load_pipeline"]
__version__ = "0.1.0"
