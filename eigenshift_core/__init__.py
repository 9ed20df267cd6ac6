"""EigenShift: make a causal LM less toxic by damping a few right-singular directions of its output layer.

The four steps: generate (`generation`), extract (`extraction`, `scoring`), reconstruct (`intervention`)
and evaluate (`evaluation`). Nothing here reads the environment or knows about web or queue code.
"""

__version__ = "0.1.0"
