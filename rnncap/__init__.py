"""rnncap: recurrent image captioning (vanilla RNN and LSTM) from scratch in NumPy."""

__version__ = "0.1.0"
