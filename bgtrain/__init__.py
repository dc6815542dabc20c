"""bgtrain: BoostLU and large-loss training for partially annotated multi-label data."""
__version__ = "0.1.0"
