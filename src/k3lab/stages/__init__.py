"""Lightning stages: one LightningModule per training stage, no inheritance between them."""
