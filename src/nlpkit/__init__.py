"""nlpkit: fine-tuning recipes for Hugging Face models behind one CLI."""

__version__ = "0.1.0"
