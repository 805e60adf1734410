"""Lightning stages: one LightningModule per training stage. They do not inherit from one another, with one
exception: :class:`~k3lab.stages.inpainting.InpaintingStage` is the text-to-image stage with more U-Net inputs (its
docstring says why it subclasses)."""
