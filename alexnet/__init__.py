"""alexnet-ray: the 2012 AlexNet paper reproduced at cluster scale on Ray."""

__version__ = "0.1.0"
