"""Heads on top of an encoder's taps: the linear probe, the VOC classifier, the detector and the FCN."""
