"""Looking inside trained models: feature maps, filters, saliency and Grad-CAM (``internals``),
their gradients on each backend, the checks of the arrays they take (``arrays``), the figures and the run's
report. Import after the backend is chosen."""
