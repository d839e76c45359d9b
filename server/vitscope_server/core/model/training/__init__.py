"""Training a timm ViT classifier from scratch on small data (the built-in digits models).

`data` splits and loads the images exactly as the server preprocesses them, `initialization`
gives a ViT a starting point that trains in CPU-minutes, and `classifier` runs the recipe and
writes the weights with their metrics. `vitscope-server train-classifier` is the command.
"""
