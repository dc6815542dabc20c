"""bgtrain: BoostLU and large-loss training for partially annotated multi-label data.

Importing bgtrain changes nothing in the process; the command-line entry points set what they need
(:mod:`bgtrain.process_env`).
"""

__version__ = "0.1.0"
