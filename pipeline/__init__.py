"""advpure: distributed batch evaluation of adversarial purification defenses."""

__version__ = "0.1.0"
