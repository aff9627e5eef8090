"""fmnist_keras: train and inspect Keras 3 classifiers on Fashion-MNIST, on any backend.

Importing the package does not import Keras: Keras fixes its backend at first
import, so the commands choose the backend (``fmnist_keras.backend``) first.
Modules that build or run models (``models``, ``engine``) import Keras.
"""

__version__ = "0.1.0"
