"""resnet-pipeline: train ResNet image classifiers on TensorFlow, from raw images to a registered model."""

__version__ = "0.1.0"
