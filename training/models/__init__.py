"""X-WIN networks: ViT encoder, predictors, domain classifier and the composite world model."""

from xwin.training.models.domain import DomainClassifier
from xwin.training.models.predictors import MaskPredictor, ViewPredictor
from xwin.training.models.vit import VisionTransformer, sincos_2d
from xwin.training.models.xwin import EMAEncoder, XWin, build_encoder

__all__ = [
    "DomainClassifier",
    "EMAEncoder",
    "MaskPredictor",
    "ViewPredictor",
    "VisionTransformer",
    "XWin",
    "build_encoder",
    "sincos_2d",
]
