"""moejax: a Mixture-of-Experts transformer served over a 4D (dp, pp, tp, ep) device mesh.

Importing moejax does not start JAX or change its flags; scripts provision devices first.
"""
