"""The tests' S3 server: SeaweedFS on loopback; the class lives in `resnet_pipeline.devs3`."""

from resnet_pipeline.devs3 import PORT_FLAGS, SeaweedS3, SeaweedS3Error, find_weed

__all__ = ["PORT_FLAGS", "SeaweedS3", "SeaweedS3Error", "find_weed"]
