"""The identity purifier (no defense), registered as "none"."""
from pipeline.purifiers.base import Identity
from pipeline.registry import PURIFIERS


@PURIFIERS.register("none")
def build() -> Identity:
    """No purification (undefended baseline)."""
    return Identity()
