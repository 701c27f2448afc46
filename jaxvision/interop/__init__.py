"""Where the two frameworks meet: torch <-> Flax weight conversion and torchvision's pretrained
weights converted to Flax."""
