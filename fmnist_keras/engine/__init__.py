"""The training machinery: splits, the recipe, fit with Keras's callbacks, evaluation, the torch fast
path and data parallelism. Its modules import Keras: import them only after the backend is chosen."""
