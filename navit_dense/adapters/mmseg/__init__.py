"""mmsegmentation plug-in (needs mmsegmentation 1.x + full mmcv; see tools/install_mmseg.sh).

Importing this package registers ``NaViTMMSegBackbone`` and ``NativeResolutionEncoderDecoder``
in mmseg's MODELS registry; configs load it with
``custom_imports = dict(imports=["navit_dense.adapters.mmseg"], allow_failed_imports=False)``.
The navit_dense core never imports it. See backbone.py for how images stay at native resolution.
"""

from .backbone import NativeResolutionEncoderDecoder, NaViTMMSegBackbone
from .compat import trusted_checkpoints

__all__ = ["NaViTMMSegBackbone", "NativeResolutionEncoderDecoder", "trusted_checkpoints"]
