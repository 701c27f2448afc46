"""Preprocessing constants both frameworks use: ImageNet's statistics and the augmentation's
ranges. `jaxvision.training.augment` and `torch_reference.augment` draw from the same ranges."""

# ImageNet-pretrained archs: MNIST is resized to --image-size, replicated to 3 channels and
# normalised with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The random affine augmentation: like torchvision's RandomAffine(15, (0.1, 0.1), (0.9, 1.1)) and
# asnelt/mnistvit's recipe, but drawn per image rather than per batch.
MAX_DEGREES = 15.0
MAX_TRANSLATE = 0.1  # fraction of the image size
SCALE_RANGE = (0.9, 1.1)
