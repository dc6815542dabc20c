"""Explanations of a trained CamResNet (``python -m bgtrain.explain overlay|gap``).

- :mod:`~bgtrain.explain.overlay`: CAM heatmap overlays as PNG;
- :mod:`~bgtrain.explain.gap`: the explanation-gap statistics between two models;
- :mod:`~bgtrain.explain.common`: class names and drawing helpers both use;
- ``__main__``: the command line.
"""
