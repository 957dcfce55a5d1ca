"""Task heads on the packed backbone, one family per module: OWL-ViT / OWLv2 detection
(``owl``), Segmenter decoders (``segmenter``), image classification (``classifier``)."""
