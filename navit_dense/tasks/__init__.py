"""Built-in tasks; importing this package registers them with the engine."""

from . import classification  # noqa: F401
from . import detection  # noqa: F401
from . import segmentation  # noqa: F401
