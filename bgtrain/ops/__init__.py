"""BoostLU ops behind one API; the implementation is chosen in :mod:`bgtrain.ops.dispatch`.

``boostlu(x, alpha)`` and ``boostlu_pool(cam, alpha)`` are autograd-capable and traceable by torch.compile.
``BGTRAIN_BOOSTLU=cuda|cpu|torch`` forces an implementation; ``active_implementation(device)`` says which one runs.
"""
from bgtrain.ops.dispatch import active_implementation, boostlu, boostlu_pool

__all__ = ["active_implementation", "boostlu", "boostlu_pool"]
