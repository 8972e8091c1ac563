"""The mathematics, pure: no argument checks, no devices, no files.

Every function here takes ``Params`` and ``Batch`` of arrays whose shapes
already chain and whose dtypes already agree (the edge, ``abc_jax.edge``, sees
to that) and is a plain JAX function: it can be jitted, vmapped and
differentiated as it is.

- ``model``: the graph, one sample and a batch (forward, loss, outputs).
- ``backward``: the hand-derived VJP, its batch contraction, the custom VJP.
- ``tangents``: the hand-derived JVP, its batch form, the custom JVP.
- ``norms``: per-sample gradient norms and clipping from the same rows.
- ``curvature``: Gauss-Newton- and Hessian-vector products, the Gauss-Newton blocks and
  their block preconditioner.
- ``oracles``: ``jax.grad`` and finite differences, the references.
- ``update``: the hand-rolled update rule as an Optax transformation.
"""
