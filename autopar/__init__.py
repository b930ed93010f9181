"""autopar: plan and run data/tensor/pipeline parallel training of Hugging Face causal LMs.

Importing autopar imports neither torch nor transformers; each stage imports
what it needs when it runs (profile -> cost -> plan -> execute).
"""

__version__ = "0.1.0"
