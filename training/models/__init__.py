"""X-WIN networks: ViT encoder, predictors, domain classifier and the composite world model."""

from training.models.domain import DomainClassifier
from training.models.predictors import MaskPredictor, ViewPredictor
from training.models.vit import VisionTransformer, sincos_2d
from training.models.xwin import EMAEncoder, XWin, build_encoder

__all__ = ["DomainClassifier", "EMAEncoder", "MaskPredictor", "ViewPredictor", "VisionTransformer", "XWin",
           "build_encoder", "sincos_2d"]
