"""simgap: measure and control the similarity gap between CLIP training data and benchmarks."""

__version__ = "0.1.0"
